"""Weight matching (Ainsworth, Hayase & Srinivasa, "Git Re-Basin", 2023, Algorithm 1).

Maximise ``Σ_keys <W_A, π(W_B)>`` over permutations ``π`` by coordinate descent: visit the groups in
a random order; for each group, with all other groups fixed, the objective is linear in that group's
permutation matrix, so the best one is a linear assignment problem
(:func:`scipy.optimize.linear_sum_assignment`). Repeat until a full pass improves no group.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from lmc.permutation.apply import Permutation, apply_permutation, identity_permutation, permute_axis
from lmc.permutation.spec import PermutationSpec

__all__ = ["weight_matching", "matching_objective"]


def _features_first(w: torch.Tensor, axis: int, n: int) -> torch.Tensor:
    """``w`` reshaped to (n, -1) with the permuted axis (n blocks) first."""
    w = w.movedim(axis, 0)
    return w.reshape(n, -1)


def matching_objective(
    spec: PermutationSpec, perm: Permutation, params_a: dict[str, torch.Tensor], params_b: dict[str, torch.Tensor]
) -> float:
    """``Σ_keys <W_A, π(W_B)>`` over the spec's keys present in both dicts (float64)."""
    keys = [k for k in params_a if k in params_b and any(g is not None for g in spec.axes_to_perm.get(k, ()))]
    permuted = apply_permutation(spec, perm, {k: params_b[k].detach() for k in keys})
    return float(sum(torch.vdot(params_a[k].detach().double().flatten(), permuted[k].double().flatten())
                     for k in keys))


def weight_matching(
    spec: PermutationSpec,
    params_a: dict[str, torch.Tensor],
    params_b: dict[str, torch.Tensor],
    max_iter: int = 100,
    seed: int = 0,
    init_perm: Permutation | None = None,
    dtype: torch.dtype = torch.float64,
) -> Permutation:
    """The permutation of B that best matches A's weights (Git Re-Basin's weight matching).

    ``params_a``/``params_b`` map state-dict keys to tensors (typically the models' parameters; pass
    buffers too only if they should count in the objective). Returns ``{group: LongTensor}``; apply it
    to B with :func:`lmc.apply_permutation`.
    """
    keys = [k for k in params_a if k in params_b]
    a = {k: params_a[k].detach().to(dtype) for k in keys}
    b = {k: params_b[k].detach().to(dtype) for k in keys}
    perm = {g: p.clone() for g, p in (init_perm or identity_permutation(spec)).items()}
    groups = [g for g in spec.perm_to_axes if any(ref.key in a for ref in spec.perm_to_axes[g])]
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        progress = False
        for gi in rng.permutation(len(groups)):
            g = groups[gi]
            n = spec.sizes[g]
            cost = torch.zeros(n, n, dtype=dtype)
            for ref in spec.perm_to_axes[g]:
                if ref.key not in a:
                    continue
                w_b = b[ref.key]
                for axis, other in enumerate(spec.axes_to_perm[ref.key]):
                    if other is not None and axis != ref.axis:
                        w_b = permute_axis(w_b, axis, perm[other], spec.block(ref.key, axis))
                cost += _features_first(a[ref.key], ref.axis, n) @ _features_first(w_b, ref.axis, n).T
            cost_np = cost.cpu().numpy()
            _, col = linear_sum_assignment(cost_np, maximize=True)
            old = cost_np[np.arange(n), perm[g].numpy()].sum()
            new = cost_np[np.arange(n), col].sum()
            if new > old + 1e-12 * max(1.0, abs(old)):
                progress = True
                perm[g] = torch.from_numpy(col).long()
        if not progress:
            break
    return perm
