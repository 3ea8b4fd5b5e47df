"""Alignment methods behind one interface, registered by name.

A method is a dataclass whose fields are its options (their defaults are the defaults of ``align=<name>``
on the command line; each field's comment says what it does) and whose call

    method(spec, model_a, model_b, data) -> Permutation | None

returns the permutation of B that aligns it to A (apply it with :func:`lmc.apply_permutation`).
A user's own method is any class of that shape, named by ``align._target_``. Training batches for
the data-driven methods are drawn from ``data.x_train`` with a generator seeded by the method's ``seed``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, Protocol

import torch
from torch import nn

from lmc.core.data import Dataset
from lmc.core.permutation import (
    MatchingRuns,
    Permutation,
    PermutationSpec,
    activation_matching,
    identity_permutation,
    merge_many,
    sinkhorn_rebasin,
    ste,
    weight_matching_restarts,
)
from lmc.core.permutation.annealing import annealing
from lmc.errors import ConfigError
from lmc.settings import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, parse

__all__ = ["ALIGN_METHODS", "MERGE_MODES", "ActivationMatching", "AlignmentMethod", "Annealing", "NoAlignment", "STE",
           "Sinkhorn", "WeightMatching", "align", "align_many", "check_merge", "check_same_architecture",
           "method_from_options", "train_batches"]

Seed = NonNegativeInt
RESTARTS = 1  # default align.restarts: from init="sequential" one run suffices (benchmarks/wm_restarts.py)


class AlignmentMethod(Protocol):
    def __call__(self, spec: PermutationSpec, model_a: nn.Module, model_b: nn.Module,
                 data: Dataset | None) -> Permutation | None: ...


def _parameters(model: nn.Module) -> dict:
    return {k: v.detach() for k, v in model.named_parameters()}


def train_batches(data: Dataset, batch_size: int, seed: int, labels: bool = True) -> Iterator:
    """Endless random training batches ``(x, y)`` (or ``x``), seeded."""
    if batch_size < 1:
        raise ConfigError(f"align.batch_size must be a positive integer, got {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    n = len(data.x_train)
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - min(batch_size, n) + 1, batch_size):
            idx = order[start : start + batch_size].to(data.x_train.device)
            yield (data.x_train[idx], data.y_train[idx]) if labels else data.x_train[idx]


def _needs_data(name: str, data: Dataset | None) -> Dataset:
    if data is None:
        raise ValueError(f"align.method {name} needs training data")
    return data


@dataclass
class WeightMatching:
    """Git Re-Basin weight matching: coordinate descent over the permutation groups in random order, one
    linear assignment per group, until no group improves."""

    max_iter: PositiveInt = 100  # passes over all groups at most
    seed: Seed = 0  # seeds the random group order (restart r: the r-th order drawn from it)
    restarts: PositiveInt = RESTARTS  # descents from different group orders, the highest objective kept
    init: Literal["identity", "sequential"] = "sequential"  # start: each group placed once | identity (Git Re-Basin)

    def __call__(self, spec, model_a, model_b, data=None) -> Permutation:
        return self.runs(spec, model_a, model_b).perm

    def runs(self, spec, model_a, model_b) -> MatchingRuns:
        """Every restart's objective and seed, and the permutation of the one kept."""
        return weight_matching_restarts(spec, _parameters(model_a), _parameters(model_b), restarts=self.restarts,
                                        seed=self.seed, init=self.init, max_iter=self.max_iter)


@dataclass
class ActivationMatching:
    """Activation matching (Git Re-Basin §3.1): one linear assignment per group on the similarity of the two
    models' activations at every permutation point, over training batches (float64 statistics)."""

    similarity: Literal["correlation", "inner_product"] = "correlation"  # Pearson, or uncentred second moment
    num_batches: PositiveInt = 10  # training batches the statistics are accumulated over
    batch_size: PositiveInt = 256  # examples per batch
    seed: Seed = 0  # seeds which training batches are drawn

    def __call__(self, spec, model_a, model_b, data=None) -> Permutation:
        batches = train_batches(_needs_data("activation_matching", data), self.batch_size, self.seed, labels=False)
        return activation_matching(spec, model_a, model_b, (next(batches) for _ in range(self.num_batches)),
                                   similarity=self.similarity)


@dataclass
class STE:
    """Straight-through estimator (Git Re-Basin §3.3): learn free weights, project B onto them by weight
    matching each step, minimise the midpoint loss (α = 0.5) with the straight-through gradient."""

    steps: PositiveInt = 1000  # optimisation steps (one training batch each)
    lr: PositiveFloat = 1e-3  # Adam learning rate of the free weights
    batch_size: PositiveInt = 256  # examples per step
    max_iter: PositiveInt = 100  # weight-matching passes per projection (warm-started from the previous step)
    seed: Seed = 0  # seeds batch order and weight-matching group order

    def __call__(self, spec, model_a, model_b, data=None) -> Permutation:
        batches = train_batches(_needs_data("ste", data), self.batch_size, self.seed)
        return ste(spec, model_a, model_a.state_dict(), model_b.state_dict(), batches, steps=self.steps, lr=self.lr,
                   seed=self.seed, wm_max_iter=self.max_iter)


@dataclass
class Sinkhorn:
    """Sinkhorn re-basin (Peña et al. 2023): learnable logits per group, soft permutations Sinkhorn(logits/τ)
    with τ annealed geometrically, hard permutation by linear assignment of the final logits."""

    objective: Literal["midpoint", "weight_distance"] = "midpoint"  # loss of (θ_A + P θ_B)/2 on training
    # batches | ‖θ_A − P θ_B‖²
    steps: PositiveInt = 1000  # optimisation steps (one training batch each for the midpoint objective)
    lr: PositiveFloat = 0.1  # Adam learning rate of the logits
    batch_size: PositiveInt = 256  # examples per step (midpoint objective)
    tau_start: PositiveFloat = 1.0  # Sinkhorn temperature at the first step
    tau_end: PositiveFloat = 0.05  # ... and at the last step
    sinkhorn_iters: PositiveInt = 20  # row/column normalisations per soft permutation
    init: Literal["random", "weight_matching"] = "random"  # near-uniform soft permutations | start at WM's result
    init_noise: NonNegativeFloat = 0.01  # std of the random initial logits
    init_scale: PositiveFloat = 1.0  # logit added on the weight-matching permutation (init=weight_matching)
    seed: Seed = 0  # seeds initial logits and batch order

    def __call__(self, spec, model_a, model_b, data=None) -> Permutation:
        batches = train_batches(_needs_data("sinkhorn", data), self.batch_size, self.seed)
        return sinkhorn_rebasin(
            spec, model_a, model_a.state_dict(), model_b.state_dict(), batches, objective=self.objective,
            steps=self.steps, lr=self.lr, tau_start=self.tau_start, tau_end=self.tau_end,
            sinkhorn_iters=self.sinkhorn_iters, init=self.init, init_noise=self.init_noise,
            init_scale=self.init_scale, seed=self.seed)


@dataclass
class Annealing:
    """Simulated annealing (Entezari et al. 2022, their ``barrier_SA``): one permutation per group, a move
    swaps two random units in every group, energy = the barrier at α = ½ on fixed training batches."""

    steps: PositiveInt = 50_000  # proposals (their code: 50 000)
    t_start: PositiveFloat = 250.0  # first temperature, in the units of metric (their tmax 25000 in percent)
    t_end: PositiveFloat = 0.025  # last temperature (their tmin 2.5 in percent)
    schedule: Literal["exponential", "linear"] = "exponential"  # cooling (simanneal's: exponential)
    metric: Literal["error", "loss"] = "error"  # energy: midpoint error (theirs) or cross-entropy minus the ends'
    proposals: PositiveInt = 1  # proposals evaluated per forward pass (speed only, same decisions)
    num_batches: PositiveInt = 1  # fixed training batches the energy is measured on (their code: 1)
    batch_size: PositiveInt = 500  # examples per batch
    seed: Seed = 0  # seeds the batches drawn and every move and acceptance draw

    def __call__(self, spec, model_a, model_b, data=None) -> Permutation:
        batches = train_batches(_needs_data("annealing", data), self.batch_size, self.seed)
        fixed = [next(batches) for _ in range(self.num_batches)]
        return annealing(spec, model_a, model_a.state_dict(), model_b.state_dict(), fixed, steps=self.steps,
                         t_start=self.t_start, t_end=self.t_end, schedule=self.schedule, metric=self.metric,
                         proposals=self.proposals, seed=self.seed)


@dataclass
class NoAlignment:
    """No alignment: only the naive interpolation of the two endpoints."""

    def __call__(self, spec, model_a, model_b, data=None) -> None:
        return None


ALIGN_METHODS: dict[str, type] = {  # align.method -> class
    "weight_matching": WeightMatching,
    "activation_matching": ActivationMatching,
    "ste": STE,
    "sinkhorn": Sinkhorn,
    "annealing": Annealing,
    "none": NoAlignment,
}
MERGE_MODES = ("none", "reference", "merge_many")


def method_from_options(method: str, options: Mapping[str, Any] | None = None) -> AlignmentMethod:
    """The built-in method ``method`` with ``options`` (its fields; unknown keys refused)."""
    if method not in ALIGN_METHODS:
        raise ConfigError(f"unknown align.method '{method}'; valid: {', '.join(sorted(ALIGN_METHODS))}")
    return parse(ALIGN_METHODS[method], dict(options or {}), "align", f" for align.method={method}")


def _own_options(method: str, options: Mapping[str, Any] | None) -> dict:
    cls = ALIGN_METHODS.get(method)
    names = {f.name for f in fields(cls)} if cls is not None else set()
    return {k: v for k, v in (options or {}).items() if k in names}


def check_same_architecture(model_a: nn.Module, model_b: nn.Module) -> None:
    """ConfigError unless both models have the same parameter and buffer names and shapes."""
    shapes_a = {k: tuple(v.shape) for k, v in model_a.state_dict().items()}
    shapes_b = {k: tuple(v.shape) for k, v in model_b.state_dict().items()}
    if shapes_a != shapes_b:
        diff = next(k for k in [*shapes_a, *shapes_b] if shapes_a.get(k) != shapes_b.get(k))
        raise ConfigError(f"cannot align models of different architectures: '{diff}' is {shapes_a.get(diff)} in "
                          f"model A and {shapes_b.get(diff)} in model B")


def align(
    method: str | AlignmentMethod,
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    data: Dataset | None = None,
    options: Mapping[str, Any] | None = None,
) -> Permutation | None:
    """Permutation of ``model_b`` aligning it to ``model_a`` by ``method`` (a built-in name, or a method
    object); ``None`` for ``none``. With a name, ``options`` may hold every method's options (an ``align``
    config section): those of ``method`` are used and checked, the others' left alone."""
    if isinstance(method, str):
        method = method_from_options(method, _own_options(method, options))
    check_same_architecture(model_a, model_b)
    return method(spec, model_a, model_b, data)


def check_merge(merge: str, method: str) -> None:
    """Valid ``align.merge`` for ``align.method`` (``none`` is always valid)."""
    if merge not in MERGE_MODES:
        raise ConfigError(f"unknown align.merge '{merge}'; valid: {', '.join(MERGE_MODES)}")
    if merge != "none" and method == "none":
        raise ConfigError(f"align.merge={merge} needs an alignment method; valid: "
                          f"{', '.join(m for m in ALIGN_METHODS if m != 'none')}")
    if merge == "merge_many" and method != "weight_matching":
        raise ConfigError(f"align.merge=merge_many uses weight matching, got align.method={method}; "
                          "valid: weight_matching")


def align_many(
    method: str | AlignmentMethod,
    merge: str,
    spec: PermutationSpec,
    models: list[nn.Module],
    data: Dataset | None = None,
    options: Mapping[str, Any] | None = None,
) -> list[Permutation]:
    """Permutations aligning every model into the first model's frame (the first gets the identity).

    ``merge="reference"`` aligns each model to the first by ``method``; ``merge="merge_many"`` runs Git
    Re-Basin's MergeMany (weight matching to the mean of the others, with the method's ``max_iter`` and
    ``seed``) and re-expresses its permutations in the first model's frame.
    """
    if isinstance(method, str):
        check_merge(merge, method)
        method = method_from_options(method, _own_options(method, options))
    if merge == "reference":
        return [identity_permutation(spec)] + [align(method, spec, models[0], m, data) for m in models[1:]]
    if not isinstance(method, WeightMatching):
        raise ConfigError(f"align.merge=merge_many uses weight matching, got {type(method).__name__}; "
                          "valid: weight_matching")
    perms, _ = merge_many(spec, [m.state_dict() for m in models], max_iter=method.max_iter, seed=method.seed)
    back = {g: torch.argsort(p) for g, p in perms[0].items()}
    return [{g: p[g][back[g]] for g in p} for p in perms]
