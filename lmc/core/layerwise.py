"""Layer-wise linear mode connectivity (Adilova et al., "Layer-wise linear mode connectivity", ICLR 2024).

The definitions follow the paper's code (github.com/link-er/layer-wise-lmc, ``LLMC/``):

* **Layers** (:func:`layer_groups`): the state-dict entries grouped by the module that holds them, in
  state-dict order (the model's order): weight and bias together, buffers such as BatchNorm's running
  statistics with their module (``util.get_layer_blocks`` groups keys by everything before the last
  dot). Modules whose name fully matches a user's regex (``layer1.*``) merge into one block.
* **Layer set S and base** (:func:`interpolated_state`): S's entries follow ``(1 − α)·θ_A^S + α·θ_B^S``
  while every other entry stays at the base, A (*into A*) or B (*into B*) (``barrier.py:
  interpolate_layer_state_dicts``). Into A, α = 0 is θ_A itself; into B, α = 1 is θ_B.
* **Barrier of S** (:func:`barrier_table`): ``max_α M(θ_base^S(α)) − [(1 − α)·M(θ_A) + α·M(θ_B)]``
  with the *full* endpoints as baseline, and the midpoint variant ``M(θ_base^S(½)) − (M(θ_A) + M(θ_B))/2``
  that the paper's heatmaps plot (``layerwise_nonconvex_heatmap.py``), both by :mod:`lmc.core.barriers`.
  M is the loss or the error (1 − accuracy, a fraction).
* **Cumulative sets** (:func:`cumulative_sets`): S grows one layer at a time in the orders ``shallow``
  (from the input), ``deep`` (from the output), ``random`` (seeded) and ``minimal`` (the first and last
  layers first, then the middle; ``layer_cumulative_compute.py``). **Windows** (:func:`window_sets`):
  every run of w consecutive layers.
* **Random-direction control** (:func:`random_direction_sets`): S's parameters move from the base by the
  same Euclidean distance as on the averaging path, ``t·‖θ_B^S − θ_A^S‖`` (t = α into A, 1 − α into B),
  along a seeded random Gaussian direction instead (``layerwise_robustness_eval.py``); several samples
  per set. Buffers (running statistics) stay at the base: a random direction in statistics has no meaning
  and could make a variance negative; the distance is measured over the same parameters.
* **Over training** (:func:`over_training_rows`): the same rows for the checkpoints of A and B at
  every kept epoch (the paper's layer × epoch heatmaps).

Curves rows (one evaluation of one network on one split; ``curves.csv`` stays one long table), the
columns :data:`LAYERWISE_COLUMNS` (today's ``lmc.io.CURVE_COLUMNS`` plus ``set``, ``base``, ``epoch``)::

    method  layer  set  base  epoch  split  alpha  loss  acc

* ``method``, ``split``, ``alpha``, ``loss``, ``acc``: as today (:func:`lmc.core.interpolation.sweep`).
* ``layer``: empty for whole-model rows (as today); otherwise the layer a figure indexes the row by:
  the layer itself (single sets and their random directions), the layer added last (cumulative sets,
  as the y axis of the paper's cumulative heatmaps), the window's first layer (windows).
* ``set``: empty for whole-model rows; otherwise the layer set's name, unique per curve:
  ``<layer>`` (one layer: the set of today's layer-wise rows), ``cum_<order>_<k>`` (the first k layers
  of ``shallow``/``deep``/``minimal``; ``cum_random<seed>_<k>`` for a seeded random order),
  ``window<w>_<first>-<last>``, ``random_dir<j>_<set>`` (sample j of the random-direction control of
  ``<set>``).
* ``base``: empty for whole-model rows; ``a`` or ``b``, the model the rest of the network stays at.
* ``epoch``: empty for the final models; the epoch of the checkpoints otherwise.

A curve is keyed by ``(method, set, base, epoch, split)``. Today's rows map onto these columns unchanged
with ``set = layer``, ``base = "a"`` if ``layer`` else ``""``, ``epoch = ""``, so a writer fills missing
columns that way and readers of today's columns keep working on tables that hold only such rows; a
reader of a table with several bases, sets or epochs keys its curves by the new columns, as
:func:`barrier_table` does. The endpoints of every layer-wise curve are the whole-model rows of the same
``method`` and ``epoch`` at α = 0 and α = 1 (:func:`layerwise_rows` writes them unless told not to).

Cost: every (set, base, α) is one evaluation, except those that are an endpoint (into A at α = 0, into B
at α = 1), which reuse the endpoint's. Layer-wise sweeps have their own α grid (the paper's {0, ½, 1}
by default). :func:`evaluate_points` evaluates several networks at once with
:func:`torch.func.functional_call` under :func:`torch.func.vmap` over their stacked parameters where
that is faster, which a short calibration on the first networks decides (:func:`batched_pays`): stacking
does the same arithmetic in fewer, larger calls (grouped convolutions, batched matrix products), which
pays where calls are cheap next to their overhead (small models, accelerators) and loses where one
network's batch already keeps the device busy (``experiments/benchmarks/interpolation.py`` times both).
"""

from __future__ import annotations

import itertools
import re
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from lmc.core.barriers import barrier, midpoint_barrier
from lmc.core.training import evaluate
from lmc.errors import ConfigError

__all__ = [
    "LAYERWISE_COLUMNS",
    "DEFAULT_ALPHAS",
    "ORDERS",
    "LayerSet",
    "Point",
    "barrier_table",
    "batched_pays",
    "cumulative_sets",
    "evaluate_points",
    "interpolated_state",
    "layer_groups",
    "layer_order",
    "layerwise_points",
    "layerwise_rows",
    "over_training_rows",
    "random_direction_sets",
    "random_displacement",
    "single_sets",
    "window_sets",
]

DEFAULT_ALPHAS = (0.0, 0.5, 1.0)  # the paper's layer-wise grid: the endpoints and the midpoint
MINIMAL_EDGE_DIVISOR = 4  # `minimal` takes n // 4 layers from each end: the paper's 5 of ResNet-18's 21 layers
MAX_STACK = 16  # networks evaluated by one vmapped call at most (memory: MAX_STACK copies of the varying entries)
BATCHED_MARGIN = 1.1  # the batched path must beat the sequential one by this factor in calibration to be used
CALIBRATION_REPEATS = 2  # timed passes per path in calibration (the best counts; a pass before them warms up)
CPU_CALIBRATION_EXAMPLES = 256  # calibration batch on the CPU (enough to reach full speed, small next to a sweep)

LAYERWISE_COLUMNS = ("method", "layer", "set", "base", "epoch", "split", "alpha", "loss", "acc")
ORDERS = ("shallow", "deep", "random", "minimal")
BASES = ("a", "b")

Splits = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
StateDict = Mapping[str, torch.Tensor]
Correction = Callable[[float, dict], dict]


# ----------------------------------------------------------------------------------------------- layers


def layer_groups(model: nn.Module | StateDict, blocks: Mapping[str, str] | Sequence[str] | str = ()
                 ) -> dict[str, list[str]]:
    """Layer name → its state-dict keys, in state-dict order: the entries of one module together (a
    Linear's weight and bias; a BatchNorm's weight, bias and running statistics); entries held by the
    root module directly form one layer each, named by their key. Layers without a floating-point entry
    (nothing to interpolate) are left out.

    ``blocks`` merges layers into blocks: regular expressions matched (in full) against module names,
    as ``{block name: pattern}`` or a list of patterns (each its own name), e.g. ``["layer1.*"]``. A
    module goes to the first block whose pattern it matches; a block sits where its first module was.
    A pattern that matches no module is a ConfigError (a typo would silently analyse layers instead)."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    if isinstance(blocks, str):
        blocks = [blocks]
    named = list(blocks.items()) if isinstance(blocks, Mapping) else [(p, p) for p in blocks]
    patterns = []
    for name, pattern in named:
        try:
            patterns.append((str(name), re.compile(pattern)))
        except re.error as exc:
            raise ConfigError(f"layer block pattern {pattern!r} is not a regular expression ({exc})") from None
    by_module: dict[str, list[str]] = {}
    for key in state:
        module = key.rpartition(".")[0] or key
        by_module.setdefault(module, []).append(key)
    groups: dict[str, list[str]] = {}
    matched = set()
    for module, keys in by_module.items():
        block = next((name for name, pattern in patterns if pattern.fullmatch(module)), None)
        if block is None and module in dict(named):
            raise ConfigError(f"layer block name {module!r} is also the name of a module outside the block; "
                              "choose another block name")
        if block is not None:
            matched.add(block)
        groups.setdefault(block or module, []).extend(keys)
    missing = [name for name, _ in named if name not in matched]
    if missing:
        raise ConfigError(f"layer block pattern(s) {', '.join(map(repr, missing))} match no module; "
                          f"modules: {', '.join(by_module)}")
    return {name: keys for name, keys in groups.items() if any(state[k].is_floating_point() for k in keys)}


@dataclass(frozen=True)
class LayerSet:
    """A set of layers that moves together. ``name`` is the curves' ``set`` column, ``layer`` their
    ``layer`` column (the layer a figure indexes the set by), ``keys`` the state-dict entries that move.
    ``direction_seed`` makes it a random-direction control: the entries move by the averaging path's
    distance along the seeded random direction instead."""

    name: str
    layer: str
    keys: tuple[str, ...]
    kind: str = "single"  # single | cumulative | window | random_dir
    direction_seed: int | None = None


def _check_groups(groups: Mapping[str, Sequence[str]]) -> list[str]:
    if not groups:
        raise ConfigError("no layers to analyse (the model has no floating-point state-dict entries)")
    return list(groups)


def _keys(groups: Mapping[str, Sequence[str]], layers: Iterable[str]) -> tuple[str, ...]:
    return tuple(k for layer in layers for k in groups[layer])


def single_sets(groups: Mapping[str, Sequence[str]]) -> list[LayerSet]:
    """One set per layer, named by the layer."""
    return [LayerSet(name, name, tuple(groups[name])) for name in _check_groups(groups)]


def layer_order(names: Sequence[str], order: str, seed: int = 0, edge: int | None = None) -> list[str]:
    """``names`` (in model order) in one of the cumulative orders:

    * ``shallow``: as given (from the input); ``deep``: reversed (from the output);
    * ``random``: a permutation drawn with ``seed``;
    * ``minimal``: the first ``edge`` layers, then the last ``edge``, then the middle in model order, as
      ``layer_cumulative_compute.py`` builds it (``keys[:5] + keys[-5:] + keys[5:-5]``). The paper's 5
      is a quarter of ResNet-18's 21 layers, so ``edge`` defaults to ``n // 4`` (at least 1); it is
      capped at ``n // 2`` so that no layer appears twice.
    """
    names = list(names)
    if order == "shallow":
        return names
    if order == "deep":
        return names[::-1]
    if order == "random":
        return [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    if order == "minimal":
        n = len(names)
        edge = max(1, n // MINIMAL_EDGE_DIVISOR) if edge is None else edge
        if isinstance(edge, bool) or not isinstance(edge, int) or edge < 0:
            raise ConfigError(f"minimal order's edge must be a non-negative integer, got {edge!r}")
        edge = min(edge, n // 2)
        return names[:edge] + names[n - edge:] + names[edge:n - edge]
    raise ConfigError(f"unknown layer order {order!r}; valid: {', '.join(ORDERS)}")


def cumulative_sets(groups: Mapping[str, Sequence[str]], order: str = "shallow", seed: int = 0,
                    edge: int | None = None) -> list[LayerSet]:
    """S grows one layer at a time in ``order`` (:func:`layer_order`): sets ``cum_<order>_<k>`` of the
    first k layers, k = 1 … n, each indexed by the layer it adds (the random order's name carries its
    seed: ``cum_random<seed>_<k>``)."""
    names = layer_order(_check_groups(groups), order, seed, edge)
    label = f"random{seed}" if order == "random" else order
    return [LayerSet(f"cum_{label}_{k}", names[k - 1], _keys(groups, names[:k]), "cumulative")
            for k in range(1, len(names) + 1)]


def window_sets(groups: Mapping[str, Sequence[str]], width: int) -> list[LayerSet]:
    """Every run of ``width`` consecutive layers (model order): sets ``window<w>_<first>-<last>``,
    indexed by their first layer."""
    names = _check_groups(groups)
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= len(names):
        raise ConfigError(f"window width must be an integer in 1..{len(names)} (the number of layers), "
                          f"got {width!r}")
    return [LayerSet(f"window{width}_{names[i]}-{names[i + width - 1]}", names[i],
                     _keys(groups, names[i:i + width]), "window")
            for i in range(len(names) - width + 1)]


def random_direction_sets(sets: Sequence[LayerSet], samples: int = 5, seed: int = 0) -> list[LayerSet]:
    """``samples`` random-direction controls of each set: ``random_dir<j>_<set>`` for j = 0 … samples − 1,
    each with its own direction seed (derived from ``seed``, j and the set's name, the same in every
    process and at every epoch)."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ConfigError(f"random-direction samples must be a non-negative integer, got {samples!r}")
    return [LayerSet(f"random_dir{j}_{s.name}", s.layer, s.keys, "random_dir",
                     zlib.crc32(f"{seed}/{j}/{s.name}".encode()))
            for s in sets if s.direction_seed is None for j in range(samples)]


# ------------------------------------------------------------------------------------ interpolated networks


def random_displacement(layer_set: LayerSet, sd_a: StateDict, sd_b: StateDict,
                         param_keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The set's parameters' displacement of length ``‖θ_B^S − θ_A^S‖`` along its seeded random direction."""
    params = set(param_keys)
    keys = [k for k in layer_set.keys if k in params and sd_a[k].is_floating_point()]
    if not keys:
        raise ConfigError(f"layer set {layer_set.name!r} has no parameters to move in a random direction")
    generator = torch.Generator().manual_seed(layer_set.direction_seed)
    direction = {k: torch.randn(sd_a[k].shape, generator=generator, dtype=sd_a[k].dtype) for k in keys}
    norm = torch.sqrt(sum((d.double() ** 2).sum() for d in direction.values()))
    distance = torch.sqrt(sum(((sd_b[k].double() - sd_a[k].double()) ** 2).sum().cpu() for k in keys))
    scale = (distance / norm).item()
    return {k: (d * scale).to(sd_a[k].device) for k, d in direction.items()}


def interpolated_state(
    sd_a: StateDict,
    sd_b: StateDict,
    layer_set: LayerSet | None,
    base: str,
    alpha: float,
    param_keys: Iterable[str] | None = None,
    displacement: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """θ_base^S(α): the set's floating-point entries at ``(1 − α)·θ_A + α·θ_B``, every other entry at the
    base (``a`` or ``b``); ``layer_set=None`` interpolates the whole model (integer buffers from A).

    A random-direction set moves its parameters (``param_keys``: the model's parameter names; buffers stay
    at the base) from the base by ``t`` times its displacement (t = α into A, 1 − α into B), the seeded
    direction scaled to ``‖θ_B^S − θ_A^S‖`` over those parameters; ``displacement`` may pass it, as
    :func:`random_displacement` computes it, to reuse it across α."""
    if base not in BASES:
        raise ConfigError(f"unknown base {base!r}; valid: a, b")
    alpha = float(alpha)
    if layer_set is None:
        return {k: torch.lerp(a, sd_b[k].to(a.device, a.dtype), alpha) if a.is_floating_point() else a
                for k, a in sd_a.items()}
    out = dict(sd_a if base == "a" else sd_b)
    if layer_set.direction_seed is None:
        for k in layer_set.keys:
            if out[k].is_floating_point():
                out[k] = torch.lerp(sd_a[k], sd_b[k].to(sd_a[k].device, sd_a[k].dtype), alpha)
        return out
    if displacement is None:
        if param_keys is None:
            raise ConfigError(f"random-direction set {layer_set.name!r} needs the model's parameter names")
        displacement = random_displacement(layer_set, sd_a, sd_b, param_keys)
    t = alpha if base == "a" else 1.0 - alpha
    for k, d in displacement.items():
        out[k] = out[k] + t * d
    return out


# ------------------------------------------------------------------------------------------- evaluation


@dataclass
class Point:
    """One network to evaluate and the rows it fills: ``labels`` holds each row's columns other than
    ``split``, ``loss``, ``acc``, and optionally ``order``, the row's place in the output; ``build()``
    returns the network's state dict (built when it is evaluated, so memory holds one chunk of networks at
    a time)."""

    labels: list[dict]
    build: Callable[[], dict[str, torch.Tensor]]


def _label(method: str, layer_set: LayerSet | None, base: str, epoch, alpha: float, order: int) -> dict:
    return {"order": order, "method": method, "layer": layer_set.layer if layer_set else "",
            "set": layer_set.name if layer_set else "", "base": base if layer_set else "",
            "epoch": "" if epoch is None else epoch, "alpha": float(alpha)}


def _check_alphas(alphas: Sequence[float]) -> list[float]:
    values = [float(a) for a in alphas]
    if (len(values) < 2 or values != sorted(set(values)) or values[0] != 0.0 or values[-1] != 1.0):
        raise ConfigError(f"layer-wise α grid must be increasing from 0 to 1 (the endpoints give the barrier's "
                          f"baseline), got {list(alphas)}")
    return values


def layerwise_points(
    model: nn.Module,
    sd_a: StateDict,
    sd_b: StateDict,
    sets: Sequence[LayerSet],
    method: str,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    bases: Sequence[str] = BASES,
    epoch: int | None = None,
    whole: bool = True,
    correct: Correction | None = None,
) -> list[Point]:
    """The networks of :func:`layerwise_rows`: the endpoints θ_A and θ_B first (each also filling the rows of
    every set whose network is that endpoint: into A at α = 0, into B at α = 1), then the whole model at the
    inner α (``whole``), then every set × base × remaining α. ``correct(α, state)`` (e.g. BatchNorm reset,
    :func:`lmc.core.normalization.corrections` with ``repair=False``) is applied to each before evaluation."""
    alphas = _check_alphas(alphas)
    for base in bases:
        if base not in BASES:
            raise ConfigError(f"unknown base {base!r}; valid: a, b")
    param_keys = [name for name, _ in model.named_parameters()]

    def built(layer_set, base, alpha):
        def build():  # a random direction is drawn again for each α: cheap next to an evaluation, no memory held
            if layer_set is None and alpha in (0.0, 1.0):  # an endpoint, as it is
                state = dict(sd_a if alpha == 0.0 else sd_b)
            else:
                state = interpolated_state(sd_a, sd_b, layer_set, base, alpha, param_keys)
            return correct(alpha, state) if correct is not None else state
        return build

    order = itertools.count()  # rows come out in this order: whole model, then by set, base and α
    labels = [_label(method, None, "", epoch, alpha, next(order)) for alpha in alphas] if whole else []
    end_a = Point(labels[:1], built(None, "a", 0.0))
    end_b = Point(labels[-1:], built(None, "b", 1.0))
    points = [end_a, end_b] + [Point([label], built(None, "a", label["alpha"])) for label in labels[1:-1]]
    for layer_set in sets:
        for base in bases:
            for alpha in alphas:
                label = _label(method, layer_set, base, epoch, alpha, next(order))
                if base == "a" and alpha == 0.0:
                    end_a.labels.append(label)
                elif base == "b" and alpha == 1.0:
                    end_b.labels.append(label)
                else:
                    points.append(Point([label], built(layer_set, base, alpha)))
    return [p for p in points if p.labels]


@torch.inference_mode()
def _evaluate_stacked(model: nn.Module, states: Sequence[Mapping[str, torch.Tensor]], x: torch.Tensor,
                      y: torch.Tensor, batch_size: int) -> list[tuple[float, float]]:
    """Mean loss and accuracy of each of ``states`` on ``(x, y)`` in one vmapped forward per batch: the
    entries that differ between the states are stacked, the others passed once. Each forward sees
    ``batch_size // len(states)`` examples per network, the same memory as one network's batch."""
    first = states[0]
    varying = [k for k in first if any(s[k] is not first[k] for s in states[1:])]
    if not varying:  # one network, several times
        return [evaluate(model, x, y, batch_size, dict(first))] * len(states)
    stacked = {k: torch.stack([s[k] for s in states]) for k in varying}
    shared = {k: v for k, v in first.items() if k not in stacked}
    count = len(states)

    def forward(params, xb):
        return torch.func.functional_call(model, (shared, params), (xb,))

    batched = torch.func.vmap(forward, in_dims=(0, None))
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros(count, dtype=torch.float64, device=x.device)
    correct = torch.zeros(count, dtype=torch.long, device=x.device)
    step = max(1, batch_size // count)
    try:
        for i in range(0, len(y), step):
            xb, yb = x[i:i + step], y[i:i + step]
            out = batched(stacked, xb)  # (count, batch, classes)
            losses = F.cross_entropy(out.flatten(0, 1).float(), yb.repeat(count), reduction="none")
            loss_sum += losses.view(count, -1).double().sum(1)
            correct += (out.argmax(-1) == yb).sum(1)
    finally:
        model.train(was_training)
    return [(loss / len(y), hits / len(y)) for loss, hits in zip(loss_sum.tolist(), correct.tolist())]


_CALIBRATED: dict[tuple, bool] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batched_pays(model: nn.Module, states: Sequence[Mapping[str, torch.Tensor]], x: torch.Tensor,
                 y: torch.Tensor, batch_size: int = 8192) -> bool:
    """Whether evaluating ``states`` in one vmapped stack beats evaluating them one after the other by
    ``BATCHED_MARGIN``: both ways timed on one batch of ``x`` (best of ``CALIBRATION_REPEATS`` after a
    warm-up), with the forwards :func:`evaluate_points` makes (``batch_size`` examples of one network, or
    ``batch_size // len(states)`` of each in the stack). The stack's size matters (the overhead stacking
    saves is per call); the examples are one whole batch on an accelerator, where fewer would favour
    stacking, and at most ``CPU_CALIBRATION_EXAMPLES`` on the CPU, where their cost would show. A model whose forward
    cannot be vmapped (an in-place write into an input, say) is evaluated one network at a time.
    Remembered per model class, entry shapes, device, stack size and batch."""
    states = list(states)
    examples = min(batch_size, len(y), CPU_CALIBRATION_EXAMPLES if x.device.type == "cpu" else batch_size)
    shapes = tuple((k, tuple(v.shape), v.dtype) for k, v in states[0].items())
    key = (type(model), shapes, str(x.device), len(states), examples)
    if key in _CALIBRATED:
        return _CALIBRATED[key]
    xb, yb = x[:examples], y[:examples]
    timings = {}
    for name, run in (("sequential", lambda: [evaluate(model, xb, yb, batch_size, dict(s)) for s in states]),
                      ("batched", lambda: _evaluate_stacked(model, states, xb, yb, batch_size))):
        try:
            run()
        except RuntimeError:  # vmap refuses the forward (e.g. in-place ops on inputs): never batch it
            _CALIBRATED[key] = False
            return False
        best = float("inf")
        for _ in range(CALIBRATION_REPEATS):
            _sync(x.device)
            start = time.perf_counter()
            run()
            _sync(x.device)
            best = min(best, time.perf_counter() - start)
        timings[name] = best
    _CALIBRATED[key] = timings["sequential"] > BATCHED_MARGIN * timings["batched"]
    return _CALIBRATED[key]


def evaluate_points(
    model: nn.Module,
    points: Sequence[Point],
    splits: Splits,
    batch_size: int = 8192,
    batched: bool | str = "auto",
    progress: bool = False,
) -> list[dict]:
    """Evaluate every point on every split: one row (:data:`LAYERWISE_COLUMNS`) per label and split.

    ``batched``: ``False`` evaluates one network after the other (:func:`lmc.core.training.evaluate`, as
    :func:`lmc.core.interpolation.sweep` does); ``True`` up to ``MAX_STACK`` networks per vmapped call;
    ``"auto"``: as :func:`batched_pays` decides on the first chunk."""
    if batched not in (True, False, "auto"):
        raise ConfigError(f"batched must be true, false or auto, got {batched!r}")
    if not splits:
        raise ConfigError("no splits to evaluate on")
    stack = 1 if batched is False else MAX_STACK
    rows = []
    bar = tqdm(total=len(points), desc="layer-wise", disable=not progress, leave=False)
    chunks = iter(points)
    while chunk := list(itertools.islice(chunks, stack)):
        states = [p.build() for p in chunk]
        if len(states) > 1 and batched == "auto":
            x, y = next(iter(splits.values()))
            if not batched_pays(model, states, x, y, batch_size):
                stack = 1
        results = {}
        for split, (x, y) in splits.items():
            if len(states) > 1 and stack > 1:
                results[split] = _evaluate_stacked(model, states, x, y, batch_size)
            else:
                results[split] = [evaluate(model, x, y, batch_size=batch_size, params=s) for s in states]
        for i, point in enumerate(chunk):
            for label in point.labels:
                for split in splits:
                    loss, acc = results[split][i]
                    rows.append({**label, "split": split, "loss": loss, "acc": acc})
        bar.update(len(chunk))
    bar.close()
    rows.sort(key=lambda r: r.get("order", 0))  # stable: splits stay in their order within a label
    return [{k: r[k] for k in LAYERWISE_COLUMNS} for r in rows]


def layerwise_rows(
    model: nn.Module,
    sd_a: StateDict,
    sd_b: StateDict,
    splits: Splits,
    sets: Sequence[LayerSet],
    method: str,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    bases: Sequence[str] = BASES,
    epoch: int | None = None,
    whole: bool = True,
    correct: Correction | None = None,
    batch_size: int = 8192,
    batched: bool | str = "auto",
    progress: bool = False,
) -> list[dict]:
    """Curves rows of every set into every base at every α on every split, and (``whole``) the whole
    model's at the same α, which hold the endpoints the barriers need; pass ``whole=False`` when the table
    already has this method's whole-model curve (at α = 0 and 1) for this epoch. ``epoch`` fills the
    ``epoch`` column (``None``: the final models). See :func:`layerwise_points`, :func:`evaluate_points`."""
    points = layerwise_points(model, sd_a, sd_b, sets, method, alphas, bases, epoch, whole, correct)
    return evaluate_points(model, points, splits, batch_size, batched, progress)


def over_training_rows(
    model: nn.Module,
    states_a: Sequence[StateDict],
    states_b: Sequence[StateDict],
    epochs: Sequence[int],
    splits: Splits,
    sets: Sequence[LayerSet],
    method: str,
    progress: bool = False,
    batch_size: int = 8192,
    batched: bool | str = "auto",
    **options,
) -> list[dict]:
    """:func:`layerwise_rows` (whole model included) for the checkpoints of A and B at each of ``epochs``
    (``states_a[i]`` and ``states_b[i]`` at ``epochs[i]``), ``epoch`` filled: the layer × epoch heatmap's
    data. ``options`` (``alphas``, ``bases``, ``correct``) go to :func:`layerwise_points`."""
    if not len(states_a) == len(states_b) == len(epochs):
        raise ConfigError(f"need one checkpoint of A and one of B per epoch, got {len(states_a)} and "
                          f"{len(states_b)} for {len(epochs)} epochs")
    if len(set(epochs)) != len(epochs):
        raise ConfigError(f"epochs must be distinct, got {list(epochs)}")
    points = [p for sd_a, sd_b, epoch in zip(states_a, states_b, epochs)
              for p in layerwise_points(model, sd_a, sd_b, sets, method, epoch=int(epoch), **options)]
    return evaluate_points(model, points, splits, batch_size, batched, progress)


# ----------------------------------------------------------------------------------------------- barriers


def _blank(value) -> str:
    return "" if value is None else str(value)


def barrier_table(rows: Iterable[Mapping]) -> list[dict]:
    """One record per curve in ``rows`` (as written, or as read back from ``curves.csv``), whole-model curves
    included (``set`` empty): ``method, set, layer, base, epoch, split`` and the barriers ``loss``,
    ``error``, ``loss_midpoint``, ``error_midpoint`` (error = 1 − accuracy), each with the linear
    interpolation of the full endpoints as baseline: the whole-model rows of the same method, epoch and
    split at α = 0 and α = 1. ``epoch`` is ``""`` for the final models, else an int."""
    curves: dict[tuple, list[Mapping]] = {}
    for r in rows:
        key = (r["method"], _blank(r.get("set")), _blank(r["layer"]), _blank(r.get("base")),
               _blank(r.get("epoch")), r["split"])
        curves.setdefault(key, []).append(r)
    out = []
    for (method, name, layer, base, epoch, split), curve in curves.items():
        whole = curves.get((method, "", "", "", epoch, split))
        ends = {float(r["alpha"]): r for r in whole or ()}
        if 0.0 not in ends or 1.0 not in ends:
            raise ConfigError(f"curve method={method!r} set={name!r} epoch={epoch!r} split={split!r} has no "
                              "whole-model rows at α = 0 and 1 to take the endpoints from")
        alphas = np.array([float(r["alpha"]) for r in curve])
        record = {"method": method, "set": name, "layer": layer, "base": base,
                  "epoch": int(epoch) if epoch else "", "split": split}
        for metric, value in (("loss", lambda r: float(r["loss"])), ("error", lambda r: 1.0 - float(r["acc"]))):
            values = np.array([value(r) for r in curve])
            ends_ab = value(ends[0.0]), value(ends[1.0])
            record[metric] = barrier(alphas, values, *ends_ab)
            record[f"{metric}_midpoint"] = midpoint_barrier(alphas, values, *ends_ab)
        out.append(record)
    return out

