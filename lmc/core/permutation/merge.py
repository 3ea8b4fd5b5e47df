"""More than two models: align all to a reference, and Git Re-Basin's MergeMany.

Ito et al. (2024) align models B, C, … to a reference A and then ask whether B and C — never aligned
to each other — are linearly connected too: :func:`lmc.core.interpolation.pairwise_barriers` measures
the barrier between every two aligned models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from lmc.core.permutation.apply import Permutation, apply_permutation, identity_permutation
from lmc.core.permutation.spec import PermutationSpec
from lmc.core.permutation.weight_matching import weight_matching

__all__ = ["align_to_reference", "merge_many"]

StateDict = dict[str, torch.Tensor]


def align_to_reference(
    spec: PermutationSpec,
    state_dicts: Sequence[StateDict],
    align_fn: Callable[[StateDict, StateDict], Permutation] | None = None,
    reference: int = 0,
) -> tuple[list[Permutation], list[StateDict]]:
    """Permutation of every model aligning it to ``state_dicts[reference]`` and the aligned state dicts.

    ``align_fn(sd_ref, sd_other) -> Permutation`` defaults to weight matching on the parameters the spec
    permutes. The reference gets the identity.
    """
    if not 0 <= reference < len(state_dicts):
        raise ValueError(f"reference {reference} out of range for {len(state_dicts)} models")
    if align_fn is None:
        align_fn = lambda a, b: weight_matching(spec, _weights(spec, a), _weights(spec, b))  # noqa: E731
    ref = state_dicts[reference]
    perms = [identity_permutation(spec) if i == reference else align_fn(ref, sd) for i, sd in enumerate(state_dicts)]
    return perms, [apply_permutation(spec, p, sd) for p, sd in zip(perms, state_dicts)]


def _weights(spec: PermutationSpec, sd: StateDict) -> StateDict:
    """Entries weight matching uses: floating-point entries the spec permutes, except running statistics."""
    permuted = spec.permuted_keys
    return {k: v for k, v in sd.items() if v.is_floating_point() and k in permuted and "running_" not in k}


def merge_many(
    spec: PermutationSpec, state_dicts: Sequence[StateDict], max_iter: int = 100, seed: int = 0
) -> tuple[list[Permutation], StateDict]:
    """Git Re-Basin's MergeMany (Algorithm 3): repeatedly weight-match each model to the mean of the others
    (in random order) until no permutation changes. Returns the permutations and the merged (mean) model."""
    n = len(state_dicts)
    if n < 2:
        raise ValueError(f"merge_many needs at least 2 models, got {n}")
    weights = [_weights(spec, sd) for sd in state_dicts]
    perms = [identity_permutation(spec) for _ in range(n)]
    aligned = [dict(w) for w in weights]
    rng = np.random.default_rng(seed)
    for it in range(max_iter):
        changed = False
        for i in rng.permutation(n):
            others = [aligned[j] for j in range(n) if j != i]
            mean = {k: sum(o[k] for o in others) / len(others) for k in weights[i]}
            new = weight_matching(spec, mean, weights[i], seed=seed + it, init_perm=perms[i])
            if any(not torch.equal(new[g], perms[i][g]) for g in new):
                changed = True
                perms[i] = new
                aligned[i] = apply_permutation(spec, new, weights[i])
        if not changed:
            break
    full = [apply_permutation(spec, p, sd) for p, sd in zip(perms, state_dicts)]
    merged = {k: (sum(f[k] for f in full) / n if v.is_floating_point() else v) for k, v in full[0].items()}
    return perms, merged
