"""Weight matching (Ainsworth, Hayase & Srinivasa, "Git Re-Basin", 2023, Algorithm 1).

Maximise ``Σ_keys <W_A, π(W_B)>`` over permutations ``π`` by coordinate descent: visit the groups in
a random order; for each group, with all other groups fixed, the objective is linear in that group's
permutation matrix, so the best one is a linear assignment problem
(:func:`scipy.optimize.linear_sum_assignment`). Repeat until a full pass improves no group.

The result is the reference algorithm's; the work is organised to avoid repeating it:

* every state-dict entry a group acts on is reshaped once, A to an ``(n, m)`` matrix and B to
  ``(n, *other axes)`` with the group's axis first, so a cost term needs one gather over the other
  permuted axes (none if there are none) and one matmul (float32 by default, accumulated in float64);
* a cost term is cached with the permutations it was computed for; when the one other group it depends
  on has changed at only some units K, it is updated by the matmul over K alone (``ΔC = A_K (B_new_K −
  B_old_K)ᵀ``) instead of recomputed — late passes move few units, so they cost little; terms that
  depend on no other group are summed once;
* a group whose cost matrix is unchanged since its last assignment cannot improve, so its assignment
  is skipped (the final "no improvement" pass usually costs nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from lmc.permutation.apply import Permutation, _expand, apply_permutation, identity_permutation
from lmc.permutation.spec import PermutationSpec

__all__ = ["weight_matching", "matching_objective", "cost_matrices"]


def matching_objective(
    spec: PermutationSpec, perm: Permutation, params_a: dict[str, torch.Tensor], params_b: dict[str, torch.Tensor]
) -> float:
    """``Σ_keys <W_A, π(W_B)>`` over the spec's keys present in both dicts (float64)."""
    keys = [k for k in params_a if k in params_b and any(g is not None for g in spec.axes_to_perm.get(k, ()))]
    permuted = apply_permutation(spec, perm, {k: params_b[k].detach() for k in keys})
    return float(sum(torch.vdot(params_a[k].detach().double().flatten(), permuted[k].double().flatten())
                     for k in keys))


@dataclass
class _Term:
    """One state-dict entry's contribution to one group's cost matrix."""

    a: torch.Tensor  # (n, *rest): A's entry with the group's axis (n blocks) first, other axes unflattened
    b: torch.Tensor  # (n, *rest): the same for B
    others: list[tuple[int, str, int]]  # (axis in a/b, group, block) of the other permuted axes
    cost: torch.Tensor | None = None  # cached (n, n) float64 cost ...
    used: list[torch.Tensor] | None = None  # ... and the permutations of ``others`` it was computed with


def _terms(spec: PermutationSpec, a: dict, b: dict, dtype: torch.dtype) -> dict[str, list[_Term]]:
    terms: dict[str, list[_Term]] = {}
    for g, refs in spec.perm_to_axes.items():
        n = spec.sizes[g]
        for ref in refs:
            if ref.key not in a or ref.key not in b:
                continue
            wa = a[ref.key].detach().to(dtype).movedim(ref.axis, 0)
            wb = b[ref.key].detach().to(dtype).movedim(ref.axis, 0).contiguous()
            others = []
            for axis, other in enumerate(spec.axes_to_perm[ref.key]):
                if other is not None and axis != ref.axis:
                    new_axis = axis + 1 if axis < ref.axis else axis
                    others.append((new_axis, other, spec.block(ref.key, axis)))
            if spec.block(ref.key, ref.axis) > 1:
                wa, wb = wa.reshape(n, -1, *wa.shape[1:]), wb.reshape(n, -1, *wb.shape[1:])
                others = [(axis + 1, other, blk) for axis, other, blk in others]
            terms.setdefault(g, []).append(_Term(wa.contiguous(), wb, others))
    return terms


def _term_cost(term: _Term, perm: Permutation, n: int) -> torch.Tensor:
    wb = term.b
    for axis, other, block in term.others:
        p = perm[other]
        if not torch.equal(p, torch.arange(len(p))):
            wb = wb.index_select(axis, _expand(p, block).to(wb.device))
    return (term.a.reshape(n, -1) @ wb.reshape(n, -1).T).double()


def _cached_cost(term: _Term, perm: Permutation, n: int) -> torch.Tensor:
    """``_term_cost``, from the cache when the other groups are unchanged, or updated over the changed units."""
    current = [perm[o] for _, o, _ in term.others]
    if term.cost is not None:
        changed = [not torch.equal(c, u) for c, u in zip(current, term.used)]
        if not any(changed):
            return term.cost
        if len(term.others) == 1:
            (axis, _, block), old, new = term.others[0], term.used[0], current[0]
            units = torch.nonzero(old != new).flatten()
            if len(units) <= len(new) // 3:  # update over the changed units only
                dev = term.b.device
                a_k = term.a.index_select(axis, _expand(units, block).to(dev)).reshape(n, -1)
                b_new = term.b.index_select(axis, _expand(new[units], block).to(dev)).reshape(n, -1)
                b_old = term.b.index_select(axis, _expand(old[units], block).to(dev)).reshape(n, -1)
                term.cost = term.cost + (a_k @ (b_new - b_old).T).double()
                term.used = current
                return term.cost
    term.cost, term.used = _term_cost(term, perm, n), current
    return term.cost


def cost_matrices(
    spec: PermutationSpec, perm: Permutation, params_a: dict, params_b: dict, dtype: torch.dtype = torch.float64
) -> dict[str, torch.Tensor]:
    """Every group's ``(n, n)`` weight-matching cost ``C[i, j]`` = similarity of A's unit i and B's unit j,
    with the other groups permuted by ``perm`` (float64, on CPU)."""
    terms = _terms(spec, params_a, params_b, dtype)
    return {g: sum(_term_cost(t, perm, spec.sizes[g]) for t in ts).cpu() for g, ts in terms.items()}


def weight_matching(
    spec: PermutationSpec,
    params_a: dict[str, torch.Tensor],
    params_b: dict[str, torch.Tensor],
    max_iter: int = 100,
    seed: int = 0,
    init_perm: Permutation | None = None,
    dtype: torch.dtype = torch.float32,
) -> Permutation:
    """The permutation of B that best matches A's weights (Git Re-Basin's weight matching).

    ``params_a``/``params_b`` map state-dict keys to tensors (typically the models' parameters; pass
    buffers too only if they should count in the objective). ``dtype`` is the matmul precision (costs
    are accumulated in float64). Returns ``{group: LongTensor}``; apply it to B with
    :func:`lmc.apply_permutation`.
    """
    terms = _terms(spec, params_a, params_b, dtype)
    perm = {g: p.clone().cpu() for g, p in (init_perm or identity_permutation(spec)).items()}
    groups = [g for g in spec.perm_to_axes if g in terms]
    version = dict.fromkeys(spec.sizes, 0)  # bumped whenever a group's permutation changes
    deps = {g: sorted({o for t in terms[g] for _, o, _ in t.others}) for g in groups}
    solved_at: dict[str, tuple[int, ...]] = {}  # versions of a group's deps at its last assignment
    const = {g: sum(_term_cost(t, perm, spec.sizes[g]).cpu() for t in terms[g] if not t.others) for g in groups}
    for ts in terms.values():
        for t in ts:
            t.cost = t.used = None

    def cost_of(g: str, exact: bool = False) -> np.ndarray:
        cost = torch.zeros(spec.sizes[g], spec.sizes[g], dtype=torch.float64) + const[g]
        for t in terms[g]:
            if t.others:
                if exact:
                    t.cost = None  # recompute from scratch: no accumulated rounding of updates
                cost += _cached_cost(t, perm, spec.sizes[g]).cpu()
        return cost.numpy()

    def assign(cost: np.ndarray, current: torch.Tensor) -> tuple[np.ndarray, float]:
        """The best assignment for ``cost`` and how much it gains over ``current``."""
        _, col = linear_sum_assignment(cost, maximize=True)
        rows = np.arange(len(col))
        return col, cost[rows, col].sum() - cost[rows, current.numpy()].sum()

    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        progress = False
        for gi in rng.permutation(len(groups)):
            g = groups[gi]
            state = tuple(version[o] for o in deps[g])
            if solved_at.get(g) == state:
                continue  # same cost matrix as at this group's last assignment: no improvement possible
            cost = cost_of(g)
            col, gain = assign(cost, perm[g])
            scale = max(1.0, float(np.abs(cost).max()) * len(col))
            if 0 < gain <= 1e-5 * scale:  # within rounding of the updated costs: check it on exact ones
                exact = cost_of(g, exact=True)
                rows = np.arange(len(col))
                gain = exact[rows, col].sum() - exact[rows, perm[g].numpy()].sum()
            solved_at[g] = state
            if gain > 1e-12 * scale:
                progress = True
                perm[g] = torch.from_numpy(col).long()
                version[g] += 1
        if not progress:
            break
    return perm
