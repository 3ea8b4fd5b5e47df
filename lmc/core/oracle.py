"""The oracle pair ("our model" of Entezari et al., ICLR 2022): a model B that *is* a permutation of model A,
so that a permutation with zero barrier is known to exist, and scores of an alignment method against it.

Entezari et al.'s ``barrier.py`` (``rahimentezari/PermutationInvariance``, "oracle barrier") permutes a
trained model with a random permutation per layer (``random.seed(model2_id); random.sample``) and
measures the barrier between the model and its permuted copy; their simulated annealing is then run on
that pair to see whether it finds the permutation back. Here B's *initialisation* is the permuted copy of
A's (:func:`permuted_copy` on the init state dict), and B is trained with A's seeds (data order,
augmentation) by :func:`lmc.core.training.train`. Training is permutation-equivariant (every operation of
the step treats units alike, and the permutation maps the one model's units onto the other's), so B stays
the permutation of A throughout training — up to floating-point rounding, which a matrix product summed
in a different unit order may change in the last bit. Models whose training draws random numbers per
unit (dropout) break this: their masks do not follow the permutation.

The planted answer is the permutation that aligns B to A: ``apply_permutation(spec, answer, θ_B) == θ_A``
— what an alignment method given ``(A, B)`` should return.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lmc.core.permutation.apply import Permutation, apply_permutation, invert_permutation, random_permutation
from lmc.core.permutation.spec import PermutationSpec

__all__ = ["barrier_removed", "permuted_copy", "unit_agreement"]


def permuted_copy(
    spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor], seed: int
) -> tuple[dict[str, torch.Tensor], Permutation]:
    """``(θ_B, answer)``: ``θ_B`` is ``state_dict`` permuted by a uniformly random permutation of every
    group (seeded), and ``answer`` the permutation aligning B back to A (the inverse of the one applied)."""
    planted = random_permutation(spec, seed)
    permuted = apply_permutation(spec, planted, {k: v.detach() for k, v in state_dict.items()})
    return {k: v.clone() for k, v in permuted.items()}, invert_permutation(planted)


def unit_agreement(found: Permutation, answer: Permutation) -> dict[str, float]:
    """Fraction of units where ``found`` agrees with ``answer``: per group, and ``"all"`` over every unit
    of every group (groups weighted by their size)."""
    if set(found) != set(answer):
        raise ValueError(f"permutations of different groups: {sorted(found)} and {sorted(answer)}")
    same = {g: int((found[g].cpu() == answer[g].cpu()).sum()) for g in answer}
    sizes = {g: len(answer[g]) for g in answer}
    out = {g: same[g] / sizes[g] for g in answer}
    out["all"] = sum(same.values()) / max(1, sum(sizes.values()))
    return out


def barrier_removed(naive: float, aligned: float) -> float:
    """Fraction of the naive barrier an alignment removes: ``(naive − aligned) / naive`` (1 = all of it;
    negative if aligning raised it; NaN when the naive barrier is not positive, there being nothing to
    remove)."""
    if not naive > 0:
        return float("nan")
    return (naive - aligned) / naive
