"""Applying, composing and sampling permutations described by a :class:`PermutationSpec`.

A permutation is a ``dict`` mapping each group name to a ``LongTensor`` ``p`` of its size.
Applying it to a state dict takes, on every axis a group acts on, ``w.index_select(axis, p)`` —
Git Re-Basin's convention: the permuted model's unit ``i`` is the original model's unit ``p[i]``.
"""

from __future__ import annotations

from collections import OrderedDict

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
    "map_pieces",
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

    Entries of ``state_dict`` the spec does not know are copied unchanged; ``state_dict`` may hold the spec's
    entries (:meth:`PermutationSpec.entries`) or whole keys (a key made of pieces is permuted piece by piece).
    ``except_axis=(entry, axis)`` leaves that one axis alone.
    """
    missing = set(spec.sizes) - set(perm)
    if missing:
        raise ValueError(f"permutation lacks groups {sorted(missing)}; expected {sorted(spec.sizes)}")

    def permuted(entry: str, w: torch.Tensor) -> torch.Tensor:
        for axis, group in enumerate(spec.axes_to_perm.get(entry, ())):
            if group is not None and (entry, axis) != except_axis:
                w = permute_axis(w, axis, perm[group], spec.block(entry, axis))
        return w

    out = OrderedDict((key, map_pieces(spec, key, w, permuted)) for key, w in state_dict.items())
    if hasattr(state_dict, "_metadata"):  # module versions, which some modules' loading reads
        out._metadata = state_dict._metadata
    return out


def map_pieces(spec: PermutationSpec, key: str, w: torch.Tensor, fn) -> torch.Tensor:
    """``fn(entry, tensor)`` applied to every entry of ``key``: to the whole tensor, or, for a key made of
    pieces, to each piece's sub-tensor, put back in a copy (differentiably)."""
    names = spec.split.get(key)
    if names is None:
        return fn(key, w)
    out = w.clone()
    for name in names:
        index = spec.pieces[name].index()
        out[index] = fn(name, w[index])
    return out
