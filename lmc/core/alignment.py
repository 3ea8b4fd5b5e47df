"""Alignment methods behind one interface: ``align(method, spec, model_a, model_b, data, options)``
returns the permutation of B that aligns it to A (apply it with :func:`lmc.apply_permutation`).

``options`` are the ``align`` config group's keys (see ``conf/align/*.yaml``); training batches for the
data-driven methods are drawn from ``data.x_train`` with a generator seeded by ``options.seed``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lmc.core.data import Dataset
from lmc.core.permutation import (
    Permutation,
    PermutationSpec,
    activation_matching,
    identity_permutation,
    merge_many,
    sinkhorn_rebasin,
    ste,
    weight_matching,
)
from lmc.errors import ConfigError

__all__ = ["ALIGN_METHODS", "MERGE_MODES", "align", "align_many", "check_merge", "check_same_architecture",
           "train_batches"]

ALIGN_METHODS = ("weight_matching", "activation_matching", "ste", "sinkhorn", "none")
MERGE_MODES = ("none", "reference", "merge_many")


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


def check_same_architecture(model_a: nn.Module, model_b: nn.Module) -> None:
    """ConfigError unless both models have the same parameter and buffer names and shapes."""
    shapes_a = {k: tuple(v.shape) for k, v in model_a.state_dict().items()}
    shapes_b = {k: tuple(v.shape) for k, v in model_b.state_dict().items()}
    if shapes_a != shapes_b:
        diff = next(k for k in [*shapes_a, *shapes_b] if shapes_a.get(k) != shapes_b.get(k))
        raise ConfigError(f"cannot align models of different architectures: '{diff}' is {shapes_a.get(diff)} in "
                          f"model A and {shapes_b.get(diff)} in model B")


def align(
    method: str,
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    data: Dataset | None = None,
    options: Mapping[str, Any] | None = None,
) -> Permutation | None:
    """Permutation of ``model_b`` aligning it to ``model_a`` by ``method`` (``None`` for ``none``)."""
    o = dict(options or {})
    seed = int(o.get("seed", 0))
    check_same_architecture(model_a, model_b)
    if method == "none":
        return None
    if method == "weight_matching":
        return weight_matching(spec, _parameters(model_a), _parameters(model_b),
                               max_iter=int(o.get("max_iter", 100)), seed=seed)
    if method not in ALIGN_METHODS:
        raise ConfigError(f"unknown align.method '{method}'; valid: {', '.join(ALIGN_METHODS)}")
    if data is None:
        raise ValueError(f"align.method {method} needs training data")
    batch_size = int(o.get("batch_size", 256))
    if method == "activation_matching":
        batches = train_batches(data, batch_size, seed, labels=False)
        num = int(o.get("num_batches", 10))
        if num < 1:
            raise ConfigError(f"align.num_batches must be a positive integer, got {num}")
        return activation_matching(spec, model_a, model_b, (next(batches) for _ in range(num)),
                                   similarity=str(o.get("similarity", "correlation")))
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    batches = train_batches(data, batch_size, seed)
    if method == "ste":
        return ste(spec, model_a, sd_a, sd_b, batches, steps=int(o.get("steps", 1000)), lr=float(o.get("lr", 1e-3)),
                   seed=seed, wm_max_iter=int(o.get("max_iter", 100)))
    return sinkhorn_rebasin(
        spec, model_a, sd_a, sd_b, batches, objective=str(o.get("objective", "midpoint")),
        steps=int(o.get("steps", 1000)), lr=float(o.get("lr", 0.1)), tau_start=float(o.get("tau_start", 1.0)),
        tau_end=float(o.get("tau_end", 0.05)), sinkhorn_iters=int(o.get("sinkhorn_iters", 20)),
        init=str(o.get("init", "random")), init_noise=float(o.get("init_noise", 0.01)),
        init_scale=float(o.get("init_scale", 1.0)), seed=seed)


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
    method: str,
    merge: str,
    spec: PermutationSpec,
    models: list[nn.Module],
    data: Dataset | None = None,
    options: Mapping[str, Any] | None = None,
) -> list[Permutation]:
    """Permutations aligning every model into the first model's frame (the first gets the identity).

    ``merge="reference"`` aligns each model to the first by ``method``; ``merge="merge_many"`` runs Git
    Re-Basin's MergeMany (weight matching to the mean of the others) and re-expresses its permutations
    in the first model's frame.
    """
    check_merge(merge, method)
    if merge == "reference":
        return [identity_permutation(spec)] + [align(method, spec, models[0], m, data, options) for m in models[1:]]
    o = dict(options or {})
    perms, _ = merge_many(spec, [m.state_dict() for m in models], max_iter=int(o.get("max_iter", 100)),
                          seed=int(o.get("seed", 0)))
    back = {g: torch.argsort(p) for g, p in perms[0].items()}
    return [{g: p[g][back[g]] for g in p} for p in perms]
