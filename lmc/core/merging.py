"""Merging models that share a basin: model soups, Model Stock, Fisher and RegMean merging, SWA.

Plain functions on state dicts of one architecture. Children of different initialisations must be
aligned to a common reference first (:func:`lmc.core.permutation.align_to_reference` or
:func:`lmc.core.permutation.merge_many`); every function here takes already-aligned state dicts.
Floating-point entries are merged; integer buffers (BatchNorm's ``num_batches_tracked``) are taken from
the first model. A merged network with BatchNorm should have its statistics recomputed
(:func:`lmc.core.normalization.reset_bn_stats`) before it is evaluated.

- **Uniform soup** (Wortsman et al., 2022, "Model soups"): the mean of the children.
- **Greedy soup** (ibid., Algorithm 1; ``mlfoundations/model-soups`` ``main.py`` step 4): children
  sorted by decreasing validation accuracy; each is added if the soup with it is no worse on the
  validation split (the paper's ``≥``; the repository's code uses ``>``: ``accept_ties=False``).
- **Model Stock** (Jang et al., 2024): per weight tensor, the cosine of the angle between the children's
  updates from the parent θ0, the ratio ``t = k·cosθ / (1 + (k − 1)·cosθ)`` and the merge
  ``t·mean(children) + (1 − t)·θ0`` (the official notebook's ``compute_angle``/``compute_ratio``, as
  FusionBench's ``method/model_stock`` reproduces it). For k > 2 the paper assumes one angle between every
  two children; we average the pairwise cosines (as mergekit's ``model_stock``; FusionBench averages
  the angles).
- **Fisher merging** (Matena & Raffel, 2022): ``θ* = Σᵢ λᵢ Fᵢ θᵢ / Σᵢ λᵢ Fᵢ`` per entry with each child's
  diagonal Fisher ``F = 1/N Σₙ E_{y∼p_θ(y|xₙ)} (∇_θ log p_θ(y|xₙ))²``, the expectation over the model's own
  predictive distribution computed exactly over the classes, per example, as in the authors' code
  (``mmatena/model_merging`` ``fisher.py``: ``_compute_exact_fisher_for_batch``); a sampled label or
  the true label (the "empirical Fisher") are options. Fishers are floored (``fisher_floor`` there).
- **RegMean** (Jin et al., 2023, "Dataless knowledge fusion"): every linear layer (and convolution, as
  a linear map of its input patches) gets the closed-form minimiser of ``Σᵢ ‖Xᵢ W − Xᵢ Wᵢ‖²``,
  ``W* = (Σᵢ G̃ᵢ)⁻¹ Σᵢ G̃ᵢ Wᵢ`` with ``Gᵢ = XᵢᵀXᵢ`` the Gram matrix of child i's own inputs to that layer and
  ``G̃ = α·G + (1 − α)·diag(G)`` (the paper's α shrinking the off-diagonal part;
  ``bloomberg/dataless-model-merging`` ``reduce_non_diag``); other entries are averaged.
- **Ensemble** (the reference merging aims at): the children's mean logits.
- **SWA** (Izmailov et al., 2018): the mean of checkpoints along one run, BatchNorm statistics recomputed.

Fisher diagonals and Gram matrices are computed by their own functions (:func:`fisher_diagonal`,
:func:`gram_matrices`), once per child, so a caller can store them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from lmc.core.normalization import has_batchnorm, reset_bn_stats
from lmc.core.training import evaluate
from lmc.errors import ConfigError

__all__ = ["FISHER_LABELS", "GreedySoup", "ModelStock", "average", "best_child", "ensemble_evaluate",
           "evaluate_each", "fisher_diagonal", "fisher_merge", "gram_matrices", "greedy_soup", "model_stock",
           "model_stock_ratio", "regmean_merge", "swa", "uniform_soup"]

StateDict = dict[str, torch.Tensor]

# --- tuning constants -------------------------------------------------------------------------------
FISHER_FLOOR = 1e-6  # Fisher entries below this count as this (Matena & Raffel's fisher_floor), so an entry
# no child is sensitive to gets the plain average and a zero Fisher never divides by zero
FISHER_CHUNK_FLOATS = 2**24  # per-example gradients fisher_diagonal holds at once (64 MiB of float32)
REGMEAN_ALPHA = 0.1  # RegMean's α: off-diagonal Gram entries scaled by α (the authors' released configs and
# FusionBench's default use 0.1; α = 1 is the exact least-squares merge)
REGMEAN_RIDGE = 1e-9  # ridge (relative to the mean diagonal of Σ G̃) pulling RegMean's solution toward the plain
# average: decides the weights of inputs no child ever saw non-zero (dead units), negligible elsewhere
COS_EPS = 1e-12  # Model Stock: two updates whose norms multiply to less than this have cosine 0 (no update)

FISHER_LABELS = ("exact", "sampled", "empirical")
_RUNNING_STATS = ("running_mean", "running_var")


# --- helpers ----------------------------------------------------------------------------------------
def _check_same_layout(state_dicts: Sequence[Mapping[str, torch.Tensor]], what: str, minimum: int = 1) -> None:
    if len(state_dicts) < minimum:
        raise ConfigError(f"{what} needs at least {minimum} model(s), got {len(state_dicts)}")
    first = state_dicts[0]
    for i, sd in enumerate(state_dicts[1:], start=1):
        if set(sd) != set(first):
            diff = sorted(set(sd) ^ set(first))
            raise ConfigError(f"{what}: model {i} has other entries than model 0 ({', '.join(diff[:3])}); "
                              "merge models of one architecture")
        for k, v in first.items():
            if sd[k].shape != v.shape:
                raise ConfigError(f"{what}: entry {k} has shape {tuple(sd[k].shape)} in model {i} but "
                                  f"{tuple(v.shape)} in model 0")


def _is_running_stat(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in _RUNNING_STATS


def average(state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None) -> StateDict:
    """``Σᵢ wᵢ θᵢ / Σᵢ wᵢ`` on every floating-point entry (default: equal weights); other entries from the first."""
    _check_same_layout(state_dicts, "average")
    if weights is None:
        weights = [1.0] * len(state_dicts)
    if len(weights) != len(state_dicts) or any(not w >= 0 for w in weights) or not sum(weights) > 0:
        raise ConfigError(f"merge weights must be {len(state_dicts)} non-negative numbers with a positive sum, "
                          f"got {list(weights)}")
    total = float(sum(weights))
    out = {}
    for k, v in state_dicts[0].items():
        if v.is_floating_point():
            acc = sum((w / total) * sd[k].to(v.device, torch.float64) for w, sd in zip(weights, state_dicts))
            out[k] = acc.to(v.dtype)
        else:
            out[k] = v
    return out


def uniform_soup(state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
    """The uniform soup: the mean of the children's weights (Wortsman et al., 2022)."""
    return average(state_dicts)


# --- evaluation: each child, the best one, the ensemble -------------------------------------------
def evaluate_each(
    model: nn.Module,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 8192,
) -> list[tuple[float, float]]:
    """``(loss, accuracy)`` of ``model`` with each state dict on ``(x, y)``."""
    return [evaluate(model, x, y, batch_size=batch_size, params=dict(sd)) for sd in state_dicts]


def best_child(
    model: nn.Module,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    batch_size: int = 8192,
) -> int:
    """Index of the child with the highest validation accuracy (the lowest index among ties): the best
    single model, chosen on held-out data as the soups paper does, then reported on the test set."""
    accs = [acc for _, acc in evaluate_each(model, state_dicts, x_val, y_val, batch_size)]
    return max(range(len(accs)), key=lambda i: (accs[i], -i))


@torch.inference_mode()
def ensemble_evaluate(
    model: nn.Module,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 8192,
    combine: str = "logits",
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of the children's ensemble on ``(x, y)``: the prediction is the mean
    of the children's logits (``combine="logits"``) or of their softmax probabilities (``"probs"``); the
    loss is the cross-entropy of that prediction."""
    if combine not in ("logits", "probs"):
        raise ConfigError(f"unknown ensemble combine '{combine}'; valid: logits, probs")
    if not state_dicts:
        raise ConfigError("the ensemble needs at least 1 model, got 0")
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    try:
        for i in range(0, len(y), batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            outs = [torch.func.functional_call(model, dict(sd), (xb,)).float() for sd in state_dicts]
            if combine == "logits":
                log_probs = torch.stack(outs).mean(0).log_softmax(-1)
            else:
                log_probs = torch.stack([o.log_softmax(-1) for o in outs]).logsumexp(0) - math.log(len(outs))
            loss_sum += F.nll_loss(log_probs, yb, reduction="sum").double()
            correct += (log_probs.argmax(1) == yb).sum()
    finally:
        model.train(was_training)
    return loss_sum.item() / len(y), correct.item() / len(y)


# --- greedy soup ----------------------------------------------------------------------------------
@dataclass
class GreedySoup:
    """The greedy soup and how it was made. ``order``: children by decreasing validation accuracy (ties:
    lower index first), the order they were tried in; ``kept``: the soup's members in the order they were
    added; ``child_val_acc[i]``: child i's own validation accuracy; ``steps``: one row per child tried,
    ``{"child", "val_acc" (the soup with it), "kept"}``; ``val_acc``: the final soup's."""

    state_dict: StateDict
    order: list[int]
    kept: list[int]
    child_val_acc: list[float]
    steps: list[dict]
    val_acc: float


def greedy_soup(
    model: nn.Module,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    correct: Callable[[StateDict], StateDict] | None = None,
    accept_ties: bool = True,
    batch_size: int = 8192,
) -> GreedySoup:
    """Greedy soup (Wortsman et al., 2022, Algorithm 1) on the validation split ``(x_val, y_val)`` — held
    out from the training set, never the test set. ``correct(θ) -> θ'`` (e.g. a BatchNorm reset) is
    applied to every candidate, children included, before it is evaluated and to the returned soup.
    A child is kept if the soup's validation accuracy with it is ``≥`` the soup's without it
    (``accept_ties=False``: ``>``, as in the repository's code), so the soup's validation accuracy never
    drops below the best child's."""
    _check_same_layout(state_dicts, "greedy soup")
    fix = correct if correct is not None else (lambda params: params)

    def val_acc(params: StateDict) -> float:
        return evaluate(model, x_val, y_val, batch_size=batch_size, params=params)[1]

    child_accs = [val_acc(fix(dict(sd))) for sd in state_dicts]
    order = sorted(range(len(state_dicts)), key=lambda i: (-child_accs[i], i))
    kept = [order[0]]
    best = child_accs[order[0]]
    soup = fix(dict(state_dicts[order[0]]))
    steps = [{"child": order[0], "val_acc": best, "kept": True}]
    for i in order[1:]:
        candidate = fix(average([state_dicts[j] for j in kept + [i]]))
        acc = val_acc(candidate)
        keep = acc >= best if accept_ties else acc > best
        steps.append({"child": i, "val_acc": acc, "kept": keep})
        if keep:
            kept.append(i)
            best, soup = acc, candidate
    return GreedySoup(soup, order, kept, child_accs, steps, best)


# --- Model Stock ----------------------------------------------------------------------------------
def model_stock_ratio(cos: float | torch.Tensor, k: int) -> float | torch.Tensor:
    """Model Stock's interpolation ratio ``t = k·cosθ / (1 + (k − 1)·cosθ)`` for ``k`` children whose updates
    from the parent meet at angle θ (Jang et al., 2024, Eq. for N models; k = 2: ``2cosθ / (1 + cosθ)``).
    Parallel updates (cos 1) give t = 1 (the children's mean); orthogonal ones (cos 0) give t = 0 (the parent)."""
    return k * cos / (1 + (k - 1) * cos)


@dataclass
class ModelStock:
    """The Model Stock merge; ``cosines``/``ratios`` per merged entry (the mean pairwise cosine of the
    children's updates, and t)."""

    state_dict: StateDict
    cosines: dict[str, float]
    ratios: dict[str, float]


def model_stock(
    parent: Mapping[str, torch.Tensor],
    children: Sequence[Mapping[str, torch.Tensor]],
    clip: bool = True,
    keys: Iterable[str] | None = None,
) -> ModelStock:
    """Model Stock (Jang et al., 2024) of ``children`` fine-tuned from ``parent``, per weight tensor:
    ``t·mean(children) + (1 − t)·parent`` with t from :func:`model_stock_ratio` of the mean pairwise cosine
    between the children's updates ``θᵢ − θ0``. ``keys`` (default: every floating-point entry except
    BatchNorm running statistics, which are averaged) are the entries merged this way. ``clip``: a
    negative mean cosine is taken as 0 (t = 0, the parent); the paper's derivation has cosθ ≥ 0, and
    below it the formula extrapolates past the parent (and divides by zero at cosθ = −1/(k − 1))."""
    children = list(children)
    if len(children) < 2:
        raise ConfigError(f"Model Stock needs a parent and at least 2 children, got {len(children)} child(ren)")
    _check_same_layout([parent] + children, "Model Stock")
    k = len(children)
    mean = average(children)
    if keys is None:
        keys = [key for key, v in parent.items() if v.is_floating_point() and not _is_running_stat(key)]
    out, cosines, ratios = dict(mean), {}, {}
    for key in keys:
        base = parent[key].to(torch.float64)
        updates = [(c[key].to(base.device, torch.float64) - base).flatten() for c in children]
        norms = [u.dot(u) for u in updates]
        pair_cos = []
        for i, j in itertools.combinations(range(k), 2):
            denom = (norms[i] * norms[j]).sqrt()
            pair_cos.append(0.0 if denom < COS_EPS else (updates[i].dot(updates[j]) / denom).clamp(-1, 1).item())
        cos = sum(pair_cos) / len(pair_cos)
        if clip:
            cos = max(cos, 0.0)
        t = model_stock_ratio(cos, k)
        out[key] = (t * mean[key].to(torch.float64) + (1 - t) * base).to(parent[key].dtype)
        cosines[key], ratios[key] = cos, t
    return ModelStock(out, cosines, ratios)


# --- layers that are linear maps of their inputs (RegMean, and the Fisher's fast path) ---------------
_CONVS = (nn.Conv1d, nn.Conv2d)


def _linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Layers RegMean merges (and whose Fisher comes from inputs and output gradients): every ``nn.Linear``,
    and every 1-D/2-D convolution with one group and zero padding given as numbers (a convolution is a
    linear map of its input patches)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) or (isinstance(m, _CONVS) and m.groups == 1 and m.padding_mode == "zeros"
                                        and not isinstance(m.padding, str)):
            out[name] = m
    return out


def _layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows the layer multiplies by its weight: ``(rows, fan_in)`` (patches for a convolution, in the
    order of ``weight.flatten(1)``)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, dilation = (1, module.kernel_size[0]), (1, module.dilation[0])
        padding, stride = (0, module.padding[0]), (1, module.stride[0])
    else:
        kernel, dilation, padding, stride = module.kernel_size, module.dilation, module.padding, module.stride
    if x.dim() == 3:  # an unbatched input
        x = x.unsqueeze(0)
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (N, fan_in, L)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _fan_in(module: nn.Module) -> int:
    return module.weight[0].numel()


# --- Fisher merging -------------------------------------------------------------------------------
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)


def _affine_norm(module: nn.Module) -> bool:
    """A normalisation layer with an affine weight whose normalised input depends on its example alone in
    eval mode (BatchNorm only with running statistics)."""
    if not isinstance(module, _NORMS) or getattr(module, "weight", None) is None:
        return False
    return not isinstance(module, nn.modules.batchnorm._BatchNorm) or module.track_running_stats


def _fisher_layers(model: nn.Module, params: Mapping[str, torch.Tensor], example: torch.Tensor) -> dict[str, nn.Module]:
    """Layers whose Fisher :func:`fisher_diagonal` computes from their inputs and output gradients: linear
    layers and convolutions (as for RegMean) and affine normalisation layers, each run once per forward pass."""
    candidates = {**_linear_layers(model), **{n: m for n, m in model.named_modules() if _affine_norm(m)}}
    calls = dict.fromkeys(candidates, 0)

    def count(name):
        def hook(module, inputs, output):
            calls[name] += 1
        return hook

    handles = [m.register_forward_hook(count(n)) for n, m in candidates.items()]
    try:
        with torch.no_grad():
            torch.func.functional_call(model, dict(params), (example,))
    finally:
        for h in handles:
            h.remove()
    return {n: m for n, m in candidates.items() if calls[n] == 1}


def _rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a layer's weight multiplies, per example, as ``(N, positions, features)``: the input rows of a
    linear layer or convolution (:func:`_layer_inputs`), or the normalised input x̂ of a normalisation
    layer, whose weight scales it elementwise (``y = γ·x̂ + β``)."""
    n = x.shape[0]
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        x_hat = (x - module.running_mean.view(shape)) / (module.running_var.view(shape) + module.eps).sqrt()
        return _channels_last_rows(x_hat)
    if isinstance(module, nn.GroupNorm):
        return _channels_last_rows(F.group_norm(x, module.num_groups, eps=module.eps))
    if isinstance(module, nn.LayerNorm):
        x_hat = F.layer_norm(x, module.normalized_shape, eps=module.eps)
        return x_hat.reshape(n, -1, module.weight.numel())
    return _layer_inputs(module, x).view(n, -1, _fan_in(module))


def _channels_last_rows(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, *spatial)`` as ``(N, positions, C)``."""
    return x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)


def _output_rows(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """The gradient at a layer's output as ``(N, positions, out)``, matching :func:`_rows`."""
    if isinstance(module, nn.Linear):
        return grad.reshape(grad.shape[0], -1, grad.shape[-1])
    if isinstance(module, nn.LayerNorm):
        return grad.reshape(grad.shape[0], -1, module.weight.numel())
    return _channels_last_rows(grad)


def fisher_diagonal(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    batches: Sequence[torch.Tensor],
    labels: str = "exact",
    targets: Sequence[torch.Tensor] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of ``model`` with ``params`` on the inputs ``batches``: for every parameter (not
    buffers) ``1/N Σₙ E_y (∂ log p(y|xₙ) / ∂θ)²`` from per-example gradients, in eval mode.

    ``labels``: ``exact`` (Matena & Raffel): the expectation over y ∼ p_θ(y|xₙ), the model's own
    prediction, summed exactly over the classes; ``sampled``: one y drawn from p_θ(y|xₙ) per example
    (generator seeded by ``seed``); ``empirical``: the true labels ``targets`` (one tensor per batch) —
    the "empirical Fisher", which is not the Fisher of the model's distribution.

    Linear layers, convolutions and affine normalisation layers get their per-example gradients from
    their inputs and the gradients at their outputs (one backward pass of the batch per class: in eval
    mode an example's output gradient depends on that example alone) — ``g ⊗ a`` for a linear layer on
    one vector, so the squares sum as ``(Σ p g²)ᵀ a²`` without forming per-example gradients; any other
    parameter (a layer run twice, a custom layer) gets them from ``torch.func.vmap``."""
    if labels not in FISHER_LABELS:
        raise ConfigError(f"unknown Fisher labels '{labels}'; valid: {', '.join(FISHER_LABELS)}")
    if labels == "empirical" and (targets is None or len(targets) != len(batches)):
        raise ConfigError("the empirical Fisher needs one tensor of true labels per batch (targets)")
    if not sum(len(xb) for xb in batches):
        raise ConfigError("fisher_diagonal needs at least one example in its batches")
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        layers = _fisher_layers(model, params, next(xb for xb in batches if len(xb))[:1])
        owned = {f"{n}.{p}" if n else p for n, m in layers.items() for p in ("weight", "bias")
                 if getattr(m, p, None) is not None}
        names = [n for n, _ in model.named_parameters()]
        fisher = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
        rest = [n for n in names if n not in owned]
        count = 0
        for b, xb in enumerate(batches):
            if not len(xb):
                continue
            with torch.no_grad():
                probs = torch.func.functional_call(model, dict(params), (xb,)).float().softmax(-1)
            if labels == "exact":  # (class, per-example weight) pairs
                picks = [(torch.full((len(xb),), c, device=xb.device), probs[:, c]) for c in range(probs.shape[1])]
            elif labels == "sampled":
                drawn = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(xb.device)
                picks = [(drawn, torch.ones(len(xb), device=xb.device))]
            else:
                picks = [(targets[b].to(xb.device), torch.ones(len(xb), device=xb.device))]
            _fisher_from_layers(model, params, layers, xb, picks, fisher)
            if rest:
                _fisher_by_vmap(model, params, rest, xb, picks, fisher)
            count += len(xb)
    finally:
        model.train(was_training)
    return {n: f / count for n, f in fisher.items()}


def _fisher_from_layers(model, params, layers, xb, picks, fisher) -> None:
    """Add Σₙ Σ_picks w (∂ log p(y|xₙ)/∂θ)² of the weights and biases of ``layers`` to ``fisher``: a linear
    layer's per-example weight gradient is ``Σ_positions g ⊗ a`` (g at its output, a its input row), a
    normalisation layer's ``Σ_positions g·x̂``; biases get ``Σ_positions g``."""
    features, outputs = {}, {}

    def capture(name):
        def hook(module, args, output):
            features[name] = _rows(module, args[0].detach()).float()
            outputs[name] = output
            return output.clone()  # later in-place operations must not touch the tensor we differentiate at
        return hook

    trainable = {n for n, _ in model.named_parameters()}
    weights = {k: (v.detach().requires_grad_() if k in trainable else v) for k, v in params.items()}
    handles = [m.register_forward_hook(capture(n)) for n, m in layers.items()]
    try:
        with torch.enable_grad():
            log_probs = torch.func.functional_call(model, weights, (xb,)).float().log_softmax(-1)
        order = list(layers)
        squared = dict.fromkeys(order)  # Σ_picks w·g² per example (N, out), for linear layers on one row
        for pick, weight in picks:
            chosen = log_probs.gather(1, pick[:, None]).sum()
            grads = torch.autograd.grad(chosen, [outputs[n] for n in order], retain_graph=True, allow_unused=True)
            for n, grad in zip(order, grads):
                if grad is None:
                    continue
                module, rows, a = layers[n], _output_rows(layers[n], grad.detach()).float(), features[n]
                prefix = f"{n}." if n else ""
                w_key, b_key = prefix + "weight", prefix + "bias"
                if isinstance(module, _NORMS):
                    fisher[w_key] += (weight @ (rows * a).sum(1).square()).view_as(fisher[w_key])
                elif rows.shape[1] == 1:
                    term = weight[:, None] * rows[:, 0].square()
                    squared[n] = term if squared[n] is None else squared[n] + term
                    continue
                else:
                    per_chunk = max(1, FISHER_CHUNK_FLOATS // (rows.shape[2] * a.shape[2]))
                    for i in range(0, len(xb), per_chunk):
                        g_i = torch.einsum("nlo,nli->noi", rows[i : i + per_chunk], a[i : i + per_chunk])
                        fisher[w_key] += torch.einsum("n,noi->oi", weight[i : i + per_chunk],
                                                      g_i.square()).view_as(fisher[w_key])
                if b_key in fisher:
                    fisher[b_key] += (weight @ rows.sum(1).square()).view_as(fisher[b_key])
        for n, sq in squared.items():
            if sq is None:
                continue
            prefix = f"{n}." if n else ""
            a = features[n][:, 0]
            fisher[prefix + "weight"] += (sq.T @ a.square()).view_as(fisher[prefix + "weight"])
            if prefix + "bias" in fisher:
                fisher[prefix + "bias"] += sq.sum(0)
    finally:
        for h in handles:
            h.remove()


def _fisher_by_vmap(model, params, names, xb, picks, fisher) -> None:
    """Add Σₙ Σ_picks w (∂ log p(y|xₙ)/∂θ)² of the parameters ``names`` to ``fisher``, from per-example
    gradients (``torch.func``), the other entries held fixed."""
    free = {n: params[n].detach() for n in names}
    fixed = {k: v for k, v in params.items() if k not in free}

    def log_prob(w, x, label):
        out = torch.func.functional_call(model, {**fixed, **w}, (x.unsqueeze(0),))
        return out.squeeze(0).float().log_softmax(-1).gather(0, label[None]).squeeze(0)

    per_example = torch.func.vmap(torch.func.grad(log_prob), in_dims=(None, 0, 0))
    per_chunk = max(1, FISHER_CHUNK_FLOATS // max(1, sum(v.numel() for v in free.values())))
    for pick, weight in picks:
        for i in range(0, len(xb), per_chunk):
            grads = per_example(free, xb[i : i + per_chunk], pick[i : i + per_chunk])
            w = weight[i : i + per_chunk]
            for n in names:
                fisher[n] += torch.einsum("n,n...->...", w, grads[n].float().square())


def fisher_merge(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    fishers: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
    floor: float = FISHER_FLOOR,
    normalize: bool = False,
) -> StateDict:
    """Fisher-weighted average (Matena & Raffel, 2022, Eq. 2): ``θ* = Σᵢ λᵢ Fᵢ θᵢ / Σᵢ λᵢ Fᵢ`` per entry that
    has a Fisher, with ``Fᵢ ← max(Fᵢ, floor)``; ``λ`` = ``weights`` (default equal). ``normalize`` divides
    each λᵢ by the L2 norm of child i's whole Fisher (an option of the authors' code). Entries without a
    Fisher (buffers) are averaged with λ. The floor applies to every child, so an entry where every
    Fisher is zero gets the plain average (the authors' code floors only the first, "target", model by
    default and so takes its value there)."""
    _check_same_layout(state_dicts, "Fisher merging")
    if len(fishers) != len(state_dicts):
        raise ConfigError(f"Fisher merging needs one Fisher per model: {len(state_dicts)} models, "
                          f"{len(fishers)} Fishers")
    if not floor >= 0:
        raise ConfigError(f"Fisher floor must be non-negative, got {floor}")
    lambdas = [1.0] * len(state_dicts) if weights is None else [float(w) for w in weights]
    if normalize:
        norms = [math.sqrt(sum(f.double().square().sum().item() for f in fisher.values())) for fisher in fishers]
        lambdas = [lam / max(norm, floor) for lam, norm in zip(lambdas, norms)]
    out = average(state_dicts, lambdas)
    for key in fishers[0]:
        ref = state_dicts[0][key]
        num = torch.zeros_like(ref, dtype=torch.float64)
        den = torch.zeros_like(ref, dtype=torch.float64)
        for lam, sd, fisher in zip(lambdas, state_dicts, fishers):
            f = fisher[key].to(ref.device, torch.float64).clamp_min(floor) * lam
            num += f * sd[key].to(ref.device, torch.float64)
            den += f
        out[key] = (num / den).to(ref.dtype)
    return out


# --- RegMean --------------------------------------------------------------------------------------
@torch.no_grad()
def gram_matrices(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    batches: Sequence[torch.Tensor],
    modules: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """RegMean's statistics of ``model`` with ``params``: for every merged layer (``modules``, default: all
    linear layers and convolutions :func:`regmean_merge` can merge), the Gram matrix of its inputs over
    ``batches``, ``[X 1]ᵀ[X 1]`` — float64, ``(fan_in + 1)²``, the last row/column being the column sums
    of X and the number of rows (so a merge can include the bias; eval mode, forward hooks)."""
    available = _linear_layers(model)
    names = list(available) if modules is None else list(modules)
    for name in names:
        if name not in available:
            raise ConfigError(f"RegMean cannot merge module '{name}'; valid: {', '.join(available) or 'none'}")
    grams: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(module, inputs, output):
            rows = _layer_inputs(module, inputs[0].detach())
            fan_in = rows.shape[1]
            block = rows.T @ rows
            col = rows.sum(0)
            gram = torch.empty(fan_in + 1, fan_in + 1, dtype=torch.float64, device=rows.device)
            gram[:fan_in, :fan_in] = block
            gram[:fan_in, fan_in] = col
            gram[fan_in, :fan_in] = col
            gram[fan_in, fan_in] = rows.shape[0]
            grams[name] = gram if name not in grams else grams[name] + gram

        return record

    handles = [available[name].register_forward_hook(hook(name)) for name in names]
    was_training = model.training
    model.eval()
    try:
        for xb in batches:
            torch.func.functional_call(model, dict(params), (xb,))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return grams


def regmean_merge(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    grams: Sequence[Mapping[str, torch.Tensor]],
    alpha: float = REGMEAN_ALPHA,
    bias: str = "average",
) -> StateDict:
    """RegMean (Jin et al., 2023): every layer with Gram matrices in ``grams`` (one mapping per child, from
    :func:`gram_matrices`) gets ``W* = (Σᵢ G̃ᵢ)⁻¹ Σᵢ G̃ᵢ Wᵢ`` (weights as ``(fan_in, out)``), ``G̃ = α·G +
    (1 − α)·diag(G)``; every other entry is averaged. ``bias="average"`` (the paper) averages biases;
    ``"augment"`` solves for weight and bias together on the inputs extended by a constant 1 — with α = 1
    that is the least-squares fit of every child's layer outputs on the pooled inputs. A tiny ridge toward
    the plain average (``REGMEAN_RIDGE``) settles the weights of inputs that were zero on every batch."""
    _check_same_layout(state_dicts, "RegMean")
    if len(grams) != len(state_dicts):
        raise ConfigError(f"RegMean needs one set of Gram matrices per model: {len(state_dicts)} models, "
                          f"{len(grams)} sets")
    if not 0 <= alpha <= 1:
        raise ConfigError(f"RegMean alpha must be in [0, 1], got {alpha}")
    if bias not in ("average", "augment"):
        raise ConfigError(f"unknown RegMean bias '{bias}'; valid: average, augment")
    out = average(state_dicts)
    for name in grams[0]:
        prefix = f"{name}." if name else ""  # "" is a model that is one layer
        w_key, b_key = f"{prefix}weight", f"{prefix}bias"
        ref = state_dicts[0][w_key]
        with_bias = bias == "augment" and b_key in state_dicts[0]
        lhs, rhs, mats = 0, 0, []
        for sd, gram in zip(state_dicts, grams):
            g = gram[name].to(ref.device, torch.float64)
            w = sd[w_key].to(ref.device, torch.float64).flatten(1)  # (out, fan_in)
            if with_bias:
                w = torch.cat([w, sd[b_key].to(ref.device, torch.float64)[:, None]], 1)
            else:
                g = g[:-1, :-1]
            g = alpha * g + (1 - alpha) * torch.diag(g.diagonal())
            lhs = lhs + g
            rhs = rhs + g @ w.T
            mats.append(w)
        mean_w = torch.stack(mats).mean(0)
        ridge = REGMEAN_RIDGE * lhs.diagonal().mean().clamp_min(1e-300)
        eye = torch.eye(lhs.shape[0], dtype=lhs.dtype, device=lhs.device)
        merged = torch.linalg.solve(lhs + ridge * eye, rhs + ridge * mean_w.T).T  # (out, fan_in [+ 1])
        if with_bias:
            out[b_key] = merged[:, -1].to(state_dicts[0][b_key].dtype)
            merged = merged[:, :-1]
        out[w_key] = merged.reshape(ref.shape).to(ref.dtype)
    return out


# --- SWA ------------------------------------------------------------------------------------------
def swa(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    model: nn.Module | None = None,
    batches: Sequence[torch.Tensor] | None = None,
) -> StateDict:
    """Stochastic weight averaging (Izmailov et al., 2018): the mean of checkpoints of one run; for a
    ``model`` with BatchNorm, the statistics are recomputed on the training ``batches``
    (:func:`lmc.core.normalization.reset_bn_stats`), as SWA's ``bn_update`` does."""
    merged = average(state_dicts)
    if model is not None and has_batchnorm(model):
        if not batches:
            raise ConfigError("SWA of a model with BatchNorm needs training batches to recompute its statistics")
        merged = reset_bn_stats(model, merged, list(batches))
    return merged
