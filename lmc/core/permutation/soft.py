"""Soft (doubly-stochastic) permutations: differentiable application to a state dict and Sinkhorn.

A soft permutation of a group is an ``(n, n)`` matrix ``P``; applying it maps every axis the group acts
on by ``w ↦ P w`` along that axis. For a hard permutation ``P[i, p[i]] = 1`` this equals
:func:`lmc.apply_permutation` (``w.index_select(axis, p)``).
"""

from __future__ import annotations

import torch

from lmc.core.permutation.apply import map_pieces
from lmc.core.permutation.spec import PermutationSpec

__all__ = ["apply_soft_permutation", "permutation_matrix", "sinkhorn_normalize"]


def permutation_matrix(p: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    n = len(p)
    m = torch.zeros(n, n, dtype=dtype, device=p.device)
    m[torch.arange(n, device=p.device), p] = 1
    return m


def _apply_axis(w: torch.Tensor, axis: int, m: torch.Tensor, block: int) -> torch.Tensor:
    w = w.movedim(axis, 0)
    shape = w.shape
    out = m.to(w.dtype) @ w.reshape(m.shape[1], -1)
    return out.reshape(shape).movedim(0, axis)


def apply_soft_permutation(
    spec: PermutationSpec, mats: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``state_dict`` with every permuted axis multiplied by its group's matrix (differentiable)."""
    def mapped(entry: str, w: torch.Tensor) -> torch.Tensor:
        for axis, group in enumerate(spec.axes_to_perm.get(entry, ())):
            if group is not None and group in mats:
                w = _apply_axis(w, axis, mats[group], spec.block(entry, axis))
        return w

    return {key: map_pieces(spec, key, w, mapped) for key, w in state_dict.items()}


def sinkhorn_normalize(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Doubly-stochastic matrix ``exp(logits)`` normalised by alternating row/column sums (log domain).

    Each half-step ``log_p − logsumexp(log_p)`` is a ``log_softmax`` (the last one, with the final
    ``exp``, a ``softmax``): the same values, but on the CPU ``torch.exp`` and ``torch.logsumexp`` slow
    down about tenfold once entries lie more than ~87 below their row's maximum, as they do late in
    Sinkhorn re-basin (sharp logits over a small temperature), and the softmax kernels do not
    (``experiments/benchmarks/learned_alignment.py``).
    """
    if iters <= 0:
        return logits.exp()
    log_p = logits
    for _ in range(iters - 1):
        log_p = torch.log_softmax(torch.log_softmax(log_p, dim=1), dim=0)
    return torch.softmax(torch.log_softmax(log_p, dim=1), dim=0)

