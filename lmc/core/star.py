"""Star domains: Starlight, the star-model trainer, and its evaluation by pair types (Sonthalia et al.,
"Do Deep Neural Network Solutions Form a Star Domain?", ICLR 2025).

The conjecture: modulo permutations, the set of SGD solutions is a star domain — some "star model" θ is
linearly connected to every other solution. Starlight trains θ against N trained *anchors* θ_1 … θ_N:
each step draws an anchor θ_n uniformly and an interpolation weight t, and descends the loss of the
interpolated network ``(1 − t)·θ + t·θ_n`` (BatchNorm normalising with the batch's statistics), so that θ
moves towards a point whose segments to all anchors have low loss. The gradient reaching θ is the
interpolated network's gradient times ``(1 − t)`` (the chain rule through the interpolation; the
anchors are fixed). With ``mu_star`` > 0 θ's own loss is mixed in: ``(loss + μ·loss_θ) / (1 + μ)``. After
every epoch θ's BatchNorm statistics are recomputed on the training set (during the epoch θ itself is
never run). Anchors may be re-aligned to θ every few epochs (weight matching or Sinkhorn); off by
default, as in the paper.

:func:`train_star` runs :func:`lmc.core.training.train` with the star model's objective
(:class:`StarObjective`), so checkpoints, bitwise resume, the learning-rate schedule, divergence checks and
progress bars are the plain trainer's; with one anchor and ``t`` fixed at 0 it trains exactly as
:func:`~lmc.core.training.train` does.

:func:`evaluate_star` measures what the conjecture predicts, as the paper's ``results/find_barriers.py``
does: for every pair of a pair type (star–held-out, held-out–held-out, anchor–held-out, star–anchor) the
second model is aligned to the first by weight matching, the linear path between them is swept over α
(BatchNorm statistics reset at every α when the model has BatchNorm) and the loss and error barriers are
read off the curves, per pair and as mean ± std per pair type. The headline is the star–held-out
barrier against a regular–regular one: held-out models never saw the star training, so a low barrier
there is evidence for a star model rather than for a fit to the anchors. (The paper's code calls
anchor–held-out pairs "regular"; both regular pair types are available.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from tqdm.auto import tqdm

from lmc.core.barriers import barriers_from_curves
from lmc.core.data import Dataset
from lmc.core.interpolation import alpha_grid, sweep
from lmc.core.normalization import corrections, has_batchnorm, reset_bn_stats, resolve_reset_bn, stat_batches
from lmc.core.permutation import (
    Permutation,
    PermutationSpec,
    apply_permutation,
    matching_objective,
    permutation_spec,
    sinkhorn_rebasin,
    weight_matching,
)
from lmc.core.training import Objective, TrainConfig, train
from lmc.errors import ConfigError
from lmc.io import CheckpointDir

__all__ = [
    "PAIR_TYPES",
    "BarrierSummary",
    "PairBarrier",
    "StarConfig",
    "StarEvalConfig",
    "StarEvaluation",
    "StarObjective",
    "best_matching",
    "evaluate_star",
    "pair_barriers",
    "star_pairs",
    "summarise",
    "train_star",
]

T_SAMPLINGS = ("uniform", "beta", "constant")
PERMUTE_ANCHORS = ("off", "weight_matching", "sinkhorn")
PAIR_TYPES = ("star_held_out", "held_out_held_out", "anchor_held_out", "star_anchor")
EVAL_ALIGN = ("weight_matching", "none")

StateDict = Mapping[str, torch.Tensor]


@dataclass
class StarConfig:
    """Starlight's own settings (the training recipe is a :class:`~lmc.core.training.TrainConfig`)."""

    t_sampling: str = "uniform"  # uniform U(0, 1) | beta Beta(2, 2) (the paper's "normal") | constant
    t_constant: float = 0.5  # t of the constant scheme (0 trains θ alone: a plain model)
    mu_star: float = 0.0  # weight of θ's own loss: (loss + μ·loss_θ) / (1 + μ); 0 in the paper's runs
    permute_anchors: str = "off"  # re-align anchors to θ: off | weight_matching | sinkhorn (paper: off)
    permute_every: int = 1  # epochs between re-alignments (at the start of epochs 0, k, 2k, …; paper: 1)
    align_max_iter: int = 100  # weight-matching passes per re-alignment
    align_seed: int = 0  # weight matching's group order and Sinkhorn's initial logits
    sinkhorn_steps: int = 200  # Sinkhorn re-basin steps per re-alignment (weight-distance objective)
    sinkhorn_lr: float = 0.1  # its Adam learning rate on the logits
    bn_stat_batches: int | None = None  # batches for θ's BatchNorm statistics after each epoch (None: the
    # whole training set in order, as the paper's pass over its training loader)
    bn_stat_seed: int = 0  # draws those batches when bn_stat_batches is set

    def __post_init__(self) -> None:
        if self.t_sampling not in T_SAMPLINGS:
            raise ConfigError(f"unknown star.t_sampling '{self.t_sampling}'; valid: {', '.join(T_SAMPLINGS)}")
        if not 0.0 <= self.t_constant <= 1.0:
            raise ConfigError(f"star.t_constant must lie in [0, 1], got {self.t_constant}")
        if not (math.isfinite(self.mu_star) and self.mu_star >= 0):
            raise ConfigError(f"star.mu_star must be a non-negative number, got {self.mu_star}")
        if self.permute_anchors not in PERMUTE_ANCHORS:
            raise ConfigError(f"unknown star.permute_anchors '{self.permute_anchors}'; "
                              f"valid: {', '.join(PERMUTE_ANCHORS)}")
        for key in ("permute_every", "align_max_iter", "sinkhorn_steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"star.{key} must be a positive integer, got {value!r}")
        if not self.sinkhorn_lr > 0:
            raise ConfigError(f"star.sinkhorn_lr must be positive, got {self.sinkhorn_lr}")
        if self.bn_stat_batches is not None and (isinstance(self.bn_stat_batches, bool)
                                                 or not isinstance(self.bn_stat_batches, int)
                                                 or self.bn_stat_batches < 1):
            raise ConfigError(f"star.bn_stat_batches must be a positive integer or null, got {self.bn_stat_batches!r}")


def _check_state_dicts(model: nn.Module, state_dicts: Sequence[StateDict], what: str) -> None:
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for i, sd in enumerate(state_dicts):
        other = {k: tuple(v.shape) for k, v in sd.items()}
        if other != shapes:
            key = next(k for k in [*shapes, *other] if shapes.get(k) != other.get(k))
            raise ConfigError(f"{what} {i} does not fit the model: '{key}' is {other.get(key)} there and "
                              f"{shapes.get(key)} in the model")


class StarObjective(Objective):
    """Starlight's step loss for :func:`lmc.core.training.train` (see the module docstring).

    The interpolated parameters are ``torch.lerp(θ, θ_n, t)`` inside autograd, so ``backward`` accumulates
    ``(1 − t)·∇`` into θ (and nothing into the anchors, which are constants). Both forward passes run
    through :func:`torch.func.functional_call` with scratch buffers: a BatchNorm in training mode normalises
    with the batch's statistics whatever its running statistics hold, so these only absorb the updates
    and θ's own buffers stay untouched until :meth:`epoch_end` recomputes them. Anchor and ``t`` draws
    come from ``generator``; its state and the anchors' current alignments are the objective's state.
    """

    def __init__(self, model: nn.Module, anchors: Sequence[StateDict], cfg: StarConfig, generator: torch.Generator,
                 bn_batches: Callable[[], list[torch.Tensor]] | None = None,
                 spec: PermutationSpec | None = None):
        if not anchors:
            raise ConfigError("the star model needs at least one anchor, got none")
        _check_state_dicts(model, anchors, "anchor")
        if cfg.permute_anchors != "off" and spec is None:
            raise ValueError(f"star.permute_anchors={cfg.permute_anchors} needs the model's permutation spec")
        self.model, self.cfg, self.generator, self.spec = model, cfg, generator, spec
        self.bn_batches = bn_batches if has_batchnorm(model) else None
        named = list(model.named_parameters())
        self.names = [k for k, _ in named]
        self.params = [p for _, p in named]
        device = self.params[0].device
        self.originals = [{k: v.detach().to(device) for k, v in sd.items()} for sd in anchors]
        self.perms: list[Permutation | None] = [None] * len(anchors)  # current alignment of each anchor
        self.anchors = [[sd[k] for k in self.names] for sd in self.originals]  # parameters, aligned
        self.scratch = {k: b.detach().clone() for k, b in model.named_buffers()}

    def draw(self) -> tuple[int, float]:
        """The step's anchor index and ``t``, from the objective's generator."""
        n = int(torch.randint(len(self.anchors), (), generator=self.generator))
        if self.cfg.t_sampling == "uniform":
            t = float(torch.rand((), generator=self.generator))
        elif self.cfg.t_sampling == "beta":  # the median of three uniforms is Beta(2, 2)
            t = float(torch.rand(3, generator=self.generator).median())
        else:
            t = self.cfg.t_constant
        return n, t

    def loss(self, forward: Callable, x: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
        n, t = self.draw()
        mixed = {k: torch.lerp(p, a, t) for k, p, a in zip(self.names, self.params, self.anchors[n])}
        out = functional_call(self.model, {**mixed, **self.scratch}, (x,))
        loss = F.cross_entropy(out, y, label_smoothing=label_smoothing)
        if self.cfg.mu_star > 0:
            own = functional_call(self.model, {**dict(zip(self.names, self.params)), **self.scratch}, (x,))
            loss_own = F.cross_entropy(own, y, label_smoothing=label_smoothing)
            loss = (loss + self.cfg.mu_star * loss_own) / (1 + self.cfg.mu_star)
        return loss

    def epoch_start(self, epoch: int) -> None:
        if self.cfg.permute_anchors != "off" and epoch % self.cfg.permute_every == 0:
            self.align_anchors()

    def epoch_end(self, epoch: int) -> None:
        if self.bn_batches is not None:
            fresh = reset_bn_stats(self.model, self.model.state_dict(), self.bn_batches())
            self.model.load_state_dict(fresh)

    @torch.no_grad()
    def align_anchors(self) -> None:
        """Every anchor (as given) aligned to θ's current weights, starting from its last alignment."""
        star = {k: p.detach() for k, p in zip(self.names, self.params)}
        for i, original in enumerate(self.originals):
            params = {k: original[k] for k in self.names}
            if self.cfg.permute_anchors == "weight_matching":
                perm = weight_matching(self.spec, star, params, max_iter=self.cfg.align_max_iter,
                                       seed=self.cfg.align_seed, init_perm=self.perms[i])
            else:
                with torch.enable_grad():
                    perm = sinkhorn_rebasin(self.spec, self.model, star, params, objective="weight_distance",
                                            steps=self.cfg.sinkhorn_steps, lr=self.cfg.sinkhorn_lr,
                                            seed=self.cfg.align_seed)
            self._set_alignment(i, perm)

    def _set_alignment(self, i: int, perm: Permutation) -> None:
        self.perms[i] = perm
        aligned = apply_permutation(self.spec, perm, {k: self.originals[i][k] for k in self.names})
        self.anchors[i] = [aligned[k] for k in self.names]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "perms": list(self.perms)}

    def load_state_dict(self, state: Mapping) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
        for i, perm in enumerate(state.get("perms", ())):
            if perm is not None:
                self._set_alignment(i, perm)


def _bn_batches(data: Dataset, batch_size: int, cfg: StarConfig) -> Callable[[], list[torch.Tensor]]:
    """The batches θ's BatchNorm statistics are recomputed on: the training set in order, or
    ``cfg.bn_stat_batches`` batches drawn with ``cfg.bn_stat_seed`` (unaugmented)."""
    x = data.x_train
    if cfg.bn_stat_batches is None:
        return lambda: [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
    return lambda: stat_batches(x, cfg.bn_stat_batches, batch_size, cfg.bn_stat_seed)


def train_star(
    model: nn.Module,
    anchors: Sequence[StateDict],
    data: Dataset,
    train_cfg: TrainConfig,
    star_cfg: StarConfig | None = None,
    data_seed: int = 0,
    aug_seed: int | None = None,
    draw_seed: int | None = None,
    progress: bool | str = True,
    checkpoints: CheckpointDir | None = None,
    spec: PermutationSpec | None = None,
) -> list[dict]:
    """Train the star model ``model`` (from its current weights) in place against ``anchors`` (state dicts
    of trained models of the same architecture) with Starlight; returns one record per epoch as
    :func:`lmc.core.training.train` (``loss``: the mean star objective).

    Data order (``data_seed``), augmentation (``aug_seed``, default ``data_seed``) and the anchor and ``t``
    draws (``draw_seed``, default ``data_seed``; a generator of its own) are separate seeds. With
    ``checkpoints`` the run resumes bitwise (on the CPU) after an interruption, the draws and the
    anchors' alignments included. ``spec`` (for ``star_cfg.permute_anchors``) is derived from the model
    when not given.
    """
    star_cfg = StarConfig() if star_cfg is None else star_cfg
    if train_cfg.compile:
        raise ConfigError("train.compile=true is not supported by the star trainer (its steps run the model "
                          "through torch.func.functional_call); set train.compile=false")
    if star_cfg.permute_anchors != "off" and spec is None:
        spec = permutation_spec(model, data.x_train[:2])
    generator = torch.Generator().manual_seed(data_seed if draw_seed is None else draw_seed)
    objective = StarObjective(model, anchors, star_cfg, generator, _bn_batches(data, train_cfg.batch_size, star_cfg),
                              spec)
    return train(model, data, train_cfg, data_seed=data_seed, aug_seed=aug_seed,
                 progress="train star" if progress is True else progress, checkpoints=checkpoints,
                 objective=objective)


# --------------------------------------------------------------------------------------------------
# evaluation


@dataclass
class StarEvalConfig:
    """How :func:`evaluate_star` measures barriers (defaults: the paper's ``find_barriers.py``)."""

    pair_types: tuple[str, ...] = PAIR_TYPES  # which pair types to measure (see PAIR_TYPES)
    align: str = "weight_matching"  # the second model of a pair aligned to the first: weight_matching | none
    align_max_iter: int = 100  # weight-matching passes
    align_seed: int = 0  # weight matching's group order (restart r uses align_seed + r)
    align_restarts: int = 1  # weight-matching runs per pair, the highest matching objective kept; the paper
    # runs it once, but coordinate descent can stop in a poor local optimum with a much higher barrier
    num_alphas: int = 11  # α ∈ linspace(0, 1, num_alphas); find_barriers.py uses 11 points
    reset_bn: bool | str = "auto"  # recompute BatchNorm statistics at every α: auto (= model has BatchNorm) | bool
    stat_batches: int = 10  # training batches for the BatchNorm reset
    stat_batch_size: int = 500  # find_barriers.py's statistics loader uses batches of 500
    stat_seed: int = 0  # draws those batches
    eval_batch_size: int = 2048  # examples per forward pass when evaluating each α
    splits: tuple[str, ...] = ("train", "test")

    def __post_init__(self) -> None:
        self.pair_types = tuple(self.pair_types)
        self.splits = tuple(self.splits)
        bad = [p for p in self.pair_types if p not in PAIR_TYPES]
        if bad or not self.pair_types:
            raise ConfigError(f"bad star pair_types {list(self.pair_types)}; valid: a non-empty list of "
                              f"{', '.join(PAIR_TYPES)}")
        if self.align not in EVAL_ALIGN:
            raise ConfigError(f"unknown star eval align '{self.align}'; valid: {', '.join(EVAL_ALIGN)}")
        if isinstance(self.align_restarts, bool) or not isinstance(self.align_restarts, int) or self.align_restarts < 1:
            raise ConfigError(f"star eval align_restarts must be a positive integer, got {self.align_restarts!r}")
        alpha_grid(self.num_alphas)  # validates num_alphas


@dataclass(frozen=True)
class PairBarrier:
    """Barriers of one pair's linear path on one split (error as a fraction), and its endpoints."""

    pair_type: str  # star_held_out | held_out_held_out | anchor_held_out | star_anchor
    pair: str  # "<first>-<second>", e.g. "star0-held_out2"
    first: str
    second: str
    split: str
    loss: float  # max_α loss(θ_α) − [(1 − α)·loss_first + α·loss_second]
    error: float  # the same for the error
    loss_midpoint: float
    error_midpoint: float
    first_loss: float  # the endpoints as evaluated on the path (α = 0, 1)
    first_acc: float
    second_loss: float
    second_acc: float


@dataclass(frozen=True)
class BarrierSummary:
    """Mean ± sample standard deviation of one barrier over the pairs of one type (std 0 for one pair)."""

    pair_type: str
    split: str
    metric: str  # loss | error | loss_midpoint | error_midpoint
    mean: float
    std: float
    n: int


@dataclass
class StarEvaluation:
    """What :func:`evaluate_star` measured: per-pair barriers, their summary, and every pair's curve
    (rows of :func:`lmc.core.interpolation.sweep` with ``pair_type`` and ``pair`` columns added)."""

    pairs: list[PairBarrier]
    summary: list[BarrierSummary]
    curves: list[dict] = field(repr=False)

    def stat(self, pair_type: str, split: str = "train", metric: str = "loss") -> BarrierSummary:
        for s in self.summary:
            if (s.pair_type, s.split, s.metric) == (pair_type, split, metric):
                return s
        raise KeyError(f"no summary for pair_type={pair_type!r} split={split!r} metric={metric!r}")

    def ratio(self, split: str = "train", metric: str = "loss", regular: str = "held_out_held_out") -> float:
        """Mean star–held-out barrier over the mean ``regular`` one (below 1: the star model is better
        connected to unseen solutions than two ordinary solutions are to each other)."""
        star, reg = self.stat("star_held_out", split, metric).mean, self.stat(regular, split, metric).mean
        return star / reg if reg != 0 else math.inf


def star_pairs(pair_type: str, stars: int, anchors: int, held_out: int) -> list[tuple[str, str]]:
    """The pairs ``(first, second)`` of ``pair_type`` among ``stars`` star models, ``anchors`` anchors and
    ``held_out`` held-out models, named ``star<i>``, ``anchor<i>``, ``held_out<i>``; the second is aligned
    to the first."""
    star = [f"star{i}" for i in range(stars)]
    anchor = [f"anchor{i}" for i in range(anchors)]
    held = [f"held_out{i}" for i in range(held_out)]
    if pair_type == "star_held_out":
        return [(s, h) for s in star for h in held]
    if pair_type == "held_out_held_out":
        return [(held[i], held[j]) for i in range(len(held)) for j in range(i + 1, len(held))]
    if pair_type == "anchor_held_out":
        return [(a, h) for a in anchor for h in held]
    if pair_type == "star_anchor":
        return [(s, a) for s in star for a in anchor]
    raise ConfigError(f"unknown star pair type '{pair_type}'; valid: {', '.join(PAIR_TYPES)}")


def summarise(pairs: Sequence[PairBarrier]) -> list[BarrierSummary]:
    """Mean ± sample standard deviation of every barrier over the pairs of each (pair type, split)."""
    out = []
    keys = list(dict.fromkeys((p.pair_type, p.split) for p in pairs))
    for pair_type, split in keys:
        sel = [p for p in pairs if (p.pair_type, p.split) == (pair_type, split)]
        for metric in ("loss", "error", "loss_midpoint", "error_midpoint"):
            values = np.array([getattr(p, metric) for p in sel])
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            out.append(BarrierSummary(pair_type, split, metric, float(values.mean()), std, len(values)))
    return out


def best_matching(spec: PermutationSpec, params_a: StateDict, params_b: StateDict, max_iter: int = 100,
                  seed: int = 0, restarts: int = 1) -> Permutation:
    """Weight matching of B's parameters to A's, ``restarts`` times (seeds ``seed + r``); the permutation
    with the highest matching objective (the first one on ties)."""
    best, best_objective = None, -math.inf
    for restart in range(restarts):
        perm = weight_matching(spec, params_a, params_b, max_iter=max_iter, seed=seed + restart)
        objective = matching_objective(spec, perm, params_a, params_b) if restarts > 1 else 0.0
        if objective > best_objective:
            best, best_objective = perm, objective
    return best


def pair_barriers(rows: Sequence[Mapping], pair_type: str, first: str, second: str,
                  splits: Sequence[str] = ("train", "test")) -> list[PairBarrier]:
    """The barriers of one pair's path, one :class:`PairBarrier` per split, from its curve rows (those of
    :func:`lmc.core.interpolation.sweep` for one method, whole model)."""
    (method,) = {r["method"] for r in rows}
    barriers = barriers_from_curves(list(rows))[method]
    out = []
    for split in splits:
        ends = [r for r in rows if r["split"] == split and r["alpha"] in (0.0, 1.0)]
        end_a, end_b = min(ends, key=lambda r: r["alpha"]), max(ends, key=lambda r: r["alpha"])
        b = barriers[split]
        out.append(PairBarrier(pair_type, f"{first}-{second}", first, second, split, b["loss"], b["error"],
                               b["loss_midpoint"], b["error_midpoint"], end_a["loss"], end_a["acc"], end_b["loss"],
                               end_b["acc"]))
    return out


def evaluate_star(
    model: nn.Module,
    stars: Sequence[StateDict],
    anchors: Sequence[StateDict],
    held_out: Sequence[StateDict],
    data: Dataset,
    cfg: StarEvalConfig | None = None,
    spec: PermutationSpec | None = None,
    progress: bool = False,
) -> StarEvaluation:
    """Barriers of every pair of ``cfg.pair_types`` among the star models, anchors and held-out models
    (state dicts of ``model``'s architecture; ``model``'s own weights are not used), each second model
    aligned to its first by weight matching (``spec`` derived from ``model`` when not given)."""
    cfg = StarEvalConfig() if cfg is None else cfg
    models = {**{f"star{i}": sd for i, sd in enumerate(stars)}, **{f"anchor{i}": sd for i, sd in enumerate(anchors)},
              **{f"held_out{i}": sd for i, sd in enumerate(held_out)}}
    _check_state_dicts(model, list(models.values()), "model")
    todo = [(t, a, b) for t in cfg.pair_types for a, b in star_pairs(t, len(stars), len(anchors), len(held_out))]
    if not todo:
        raise ConfigError(f"no pairs to evaluate for pair types {list(cfg.pair_types)} with {len(stars)} star, "
                          f"{len(anchors)} anchor and {len(held_out)} held-out models")
    device = data.x_train.device
    models = {name: {k: v.detach().to(device) for k, v in sd.items()} for name, sd in models.items()}
    names = [k for k, _ in model.named_parameters()]
    if cfg.align == "weight_matching" and spec is None:
        spec = permutation_spec(model, data.x_train[:2])
    reset_bn = resolve_reset_bn(cfg.reset_bn, model)
    batches = stat_batches(data.x_train, cfg.stat_batches, cfg.stat_batch_size, cfg.stat_seed) if reset_bn else []
    splits = {s: data.split(s) for s in cfg.splits}
    alphas = alpha_grid(cfg.num_alphas)
    pairs, curves = [], []
    for pair_type, first, second in tqdm(todo, desc="star pairs", disable=not progress, leave=False):
        sd_a, sd_b = models[first], models[second]
        if cfg.align == "weight_matching":
            perm = best_matching(spec, {k: sd_a[k] for k in names}, {k: sd_b[k] for k in names}, cfg.align_max_iter,
                                 cfg.align_seed, cfg.align_restarts)
            sd_b = apply_permutation(spec, perm, sd_b)
        correct, suffix = corrections(model, sd_a, sd_b, batches, reset_bn=reset_bn, repair=False)
        rows = sweep(model, sd_a, sd_b, alphas, splits, cfg.align + suffix, correct=correct,
                     batch_size=cfg.eval_batch_size)
        curves += [{**r, "pair_type": pair_type, "pair": f"{first}-{second}"} for r in rows]
        pairs += pair_barriers(rows, pair_type, first, second, cfg.splits)
    return StarEvaluation(pairs, summarise(pairs), curves)
