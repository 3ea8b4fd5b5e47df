"""Applying, composing and sampling permutations described by a :class:`PermutationSpec`.

A permutation is a ``dict`` mapping each group name to a ``LongTensor`` ``p`` of its size.
Applying it to a state dict takes, on every axis a group acts on, ``w.index_select(axis, p)`` —
Git Re-Basin's convention: the permuted model's unit ``i`` is the original model's unit ``p[i]``.
"""

from __future__ import annotations

import torch

from lmc.core.permutation.spec import PermutationSpec

Permutation = dict[str, torch.Tensor]

__all__ = [
    "Permutation",
    "apply_permutation",
    "identity_permutation",
    "invert_permutation",
    "random_permutation",
    "permute_axis",
]


def identity_permutation(spec: PermutationSpec) -> Permutation:
    return {g: torch.arange(n) for g, n in spec.sizes.items()}


def random_permutation(spec: PermutationSpec, generator: torch.Generator | int | None = None) -> Permutation:
    """A uniformly random permutation of every group (``generator`` may be a seed)."""
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    return {g: torch.randperm(n, generator=generator) for g, n in spec.sizes.items()}


def invert_permutation(perm: Permutation) -> Permutation:
    return {g: torch.argsort(p) for g, p in perm.items()}


def _expand(p: torch.Tensor, block: int) -> torch.Tensor:
    if block == 1:
        return p
    return (p[:, None] * block + torch.arange(block, device=p.device)).reshape(-1)


def permute_axis(w: torch.Tensor, axis: int, p: torch.Tensor, block: int = 1) -> torch.Tensor:
    """``w`` with ``axis`` permuted by ``p`` (each index standing for ``block`` consecutive entries)."""
    return w.index_select(axis, _expand(p, block).to(w.device))


def apply_permutation(
    spec: PermutationSpec,
    perm: Permutation,
    state_dict: dict[str, torch.Tensor],
    except_axis: tuple[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """A new state dict with every permuted axis of ``state_dict`` permuted by ``perm``.

    Entries of ``state_dict`` the spec does not know are copied unchanged. ``except_axis=(key, axis)``
    leaves that one axis alone (used by weight matching).
    """
    missing = set(spec.sizes) - set(perm)
    if missing:
        raise ValueError(f"permutation lacks groups {sorted(missing)}; expected {sorted(spec.sizes)}")
    out = {}
    for key, w in state_dict.items():
        for axis, group in enumerate(spec.axes_to_perm.get(key, ())):
            if group is None or (key, axis) == except_axis:
                continue
            w = permute_axis(w, axis, perm[group], spec.block(key, axis))
        out[key] = w
    return out
