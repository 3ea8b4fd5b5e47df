"""Alignment by optimisation: Git Re-Basin's straight-through estimator and Sinkhorn re-basin.

Both minimise a loss of the permuted model B with gradient steps on training batches:

* :func:`ste` (Ainsworth et al. 2023, §3.3): learn free weights ``θ̃`` (initialised at A); each step
  projects B onto them by weight matching (the nearest permutation, warm-started), and minimises the
  loss of the midpoint ``(θ_A + π(θ_B)) / 2`` with the straight-through gradient
  ``π(θ_B) ≈ θ̃ + stopgrad(π(θ_B) − θ̃)``. The result is the final projection.
* :func:`sinkhorn_rebasin` (Peña et al. 2023): learnable logits per group, a soft permutation
  ``Sinkhorn(logits / τ)`` applied to B with τ annealed geometrically, objective the midpoint loss
  (default) or the squared weight distance ``‖θ_A − P θ_B‖²``; the hard permutation is the linear
  assignment of the final logits.

Losses are evaluated with :func:`torch.func.functional_call`; models with BatchNorm run in train mode
there (batch statistics, as the interpolated running statistics are meaningless).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from lmc.core.normalization import has_batchnorm
from lmc.core.permutation.apply import Permutation, apply_permutation
from lmc.core.permutation.soft import apply_soft_permutation, sinkhorn_normalize
from lmc.core.permutation.spec import PermutationSpec
from lmc.core.permutation.weight_matching import weight_matching
from lmc.errors import ConfigError

__all__ = ["ste", "sinkhorn_rebasin", "SINKHORN_OBJECTIVES"]

SINKHORN_OBJECTIVES = ("midpoint", "weight_distance")
SINKHORN_INITS = ("random", "weight_matching")


def _loss(model: nn.Module, state: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(functional_call(model, state, (x,)), y)


def _midpoint(sd_a: dict, sd_b: dict, buffers: set[str]) -> dict:
    """(A + B) / 2. Buffers are fresh, gradient-free copies: BatchNorm in train mode updates its running
    statistics and batch count in place, and must not see a gradient through them."""
    out = {}
    for k, v in sd_a.items():
        mid = 0.5 * (v + sd_b[k]) if v.is_floating_point() else v.clone()
        out[k] = mid.detach() if k in buffers else mid
    return out


def _descend(model: nn.Module, opt: torch.optim.Optimizer, steps: int, step_loss) -> None:
    """``steps`` optimiser steps on ``step_loss(step)``, with ``model`` in train mode only if it has
    BatchNorm (batch statistics) and its mode restored afterwards."""
    was = model.training
    model.train(has_batchnorm(model))
    try:
        for step in range(steps):
            loss = step_loss(step)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        model.train(was)


def _check(steps: int, lr: float) -> None:
    if steps < 1:
        raise ConfigError(f"align.steps must be a positive integer, got {steps}")
    if not lr > 0:
        raise ConfigError(f"align.lr must be positive, got {lr}")


def ste(
    spec: PermutationSpec,
    model: nn.Module,
    sd_a: dict[str, torch.Tensor],
    sd_b: dict[str, torch.Tensor],
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    steps: int = 1000,
    lr: float = 1e-3,
    seed: int = 0,
    wm_max_iter: int = 100,
) -> Permutation:
    """Git Re-Basin's straight-through estimator; ``batches`` yields ``(x, y)`` training batches."""
    _check(steps, lr)
    names = [k for k, _ in model.named_parameters()]
    sd_a = {k: v.detach() for k, v in sd_a.items()}
    sd_b = {k: v.detach() for k, v in sd_b.items()}
    free = {k: sd_a[k].clone().requires_grad_(True) for k in names}
    opt = torch.optim.Adam(free.values(), lr=lr)
    b_params = {k: sd_b[k] for k in names}
    buffers = {k for k, _ in model.named_buffers()}
    perm, warm = None, {}  # the projection, warm-started from the previous step's permutation and LAP prices

    def step_loss(step: int) -> torch.Tensor:
        nonlocal perm
        perm = weight_matching(spec, {k: v.detach() for k, v in free.items()}, b_params, max_iter=wm_max_iter,
                               seed=seed + step, init_perm=perm, warm_start=warm)
        proj = apply_permutation(spec, perm, sd_b)
        b_st = {**proj, **{k: free[k] + (proj[k] - free[k]).detach() for k in names}}
        x, y = next(batches)
        return _loss(model, _midpoint(sd_a, b_st, buffers), x, y)

    _descend(model, opt, steps, step_loss)
    return weight_matching(spec, {k: v.detach() for k, v in free.items()}, b_params, max_iter=wm_max_iter,
                           seed=seed + steps, init_perm=perm, warm_start=warm)


def sinkhorn_rebasin(
    spec: PermutationSpec,
    model: nn.Module,
    sd_a: dict[str, torch.Tensor],
    sd_b: dict[str, torch.Tensor],
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None,
    objective: str = "midpoint",
    steps: int = 1000,
    lr: float = 0.1,
    tau_start: float = 1.0,
    tau_end: float = 0.05,
    sinkhorn_iters: int = 20,
    init_noise: float = 0.01,
    init_scale: float = 1.0,
    init: str = "random",
    seed: int = 0,
) -> Permutation:
    """Sinkhorn re-basin; ``batches`` (``(x, y)``) is needed for the ``midpoint`` objective.

    ``init`` is ``random`` (logits ``init_noise · N(0, 1)``, near-uniform soft permutations) or
    ``weight_matching`` (logits start at ``init_scale`` on the weight-matching permutation, plus noise).
    """
    _check(steps, lr)
    if objective not in SINKHORN_OBJECTIVES:
        raise ConfigError(f"unknown align.objective '{objective}'; valid: {', '.join(SINKHORN_OBJECTIVES)}")
    if objective == "midpoint" and batches is None:
        raise ValueError("the midpoint objective needs training batches")
    sd_a = {k: v.detach() for k, v in sd_a.items()}
    sd_b = {k: v.detach() for k, v in sd_b.items()}
    device = next(iter(sd_a.values())).device
    gen = torch.Generator().manual_seed(seed)
    if init not in SINKHORN_INITS:
        raise ConfigError(f"unknown align.init '{init}'; valid: {', '.join(SINKHORN_INITS)}")
    logits = {g: init_noise * torch.randn(n, n, generator=gen) for g, n in spec.sizes.items()}
    if init == "weight_matching":
        names = [k for k, _ in model.named_parameters()]
        start = weight_matching(spec, {k: sd_a[k] for k in names}, {k: sd_b[k] for k in names}, seed=seed)
        for g, p in start.items():
            logits[g][torch.arange(len(p)), p] += init_scale
    logits = {g: v.to(device).requires_grad_(True) for g, v in logits.items()}
    opt = torch.optim.Adam(logits.values(), lr=lr)
    permuted_keys = [k for k in sd_a if k in spec.permuted_keys]
    floats_b = {k: v for k, v in sd_b.items() if v.is_floating_point()}
    buffers = {k for k, _ in model.named_buffers()}

    def step_loss(step: int) -> torch.Tensor:
        tau = tau_start * (tau_end / tau_start) ** (step / max(1, steps - 1))
        mats = {g: sinkhorn_normalize(logit / tau, sinkhorn_iters) for g, logit in logits.items()}
        soft_b = {**sd_b, **apply_soft_permutation(spec, mats, floats_b)}
        if objective == "weight_distance":
            return sum(((sd_a[k] - soft_b[k]) ** 2).sum() for k in permuted_keys)
        x, y = next(batches)
        return _loss(model, _midpoint(sd_a, soft_b, buffers), x, y)

    _descend(model, opt, steps, step_loss)
    perm = {}
    for g, logit in logits.items():
        _, col = linear_sum_assignment(logit.detach().double().cpu().numpy(), maximize=True)
        perm[g] = torch.from_numpy(col).long()
    return perm
