"""Weight matching (Ainsworth, Hayase & Srinivasa, "Git Re-Basin", 2023, Algorithm 1).

Maximise ``Σ_keys <W_A, π(W_B)>`` over permutations ``π`` by coordinate descent: visit the groups in
a random order; for each group, with all other groups fixed, the objective is linear in that group's
permutation matrix, so the best one is a linear assignment problem (LAP,
:func:`scipy.optimize.linear_sum_assignment`). Repeat until a full pass improves no group.

The algorithm is the reference's; the work is organised to avoid repeating it:

* every state-dict entry a group acts on is reshaped once with the group's axis first;
* a group's ``(n, n)`` cost is computed when it is first solved (float32 matmuls by default,
  accumulated in float64) and afterwards only where other groups moved: an entry whose other axis's
  permutation changed at units K gets ``ΔC = A_K (B_new_K − B_old_K)ᵀ``, a matmul over K alone, so
  late passes, which move few units, cost little (where most units moved, an entry of a group of up
  to ``_KEEP`` units whose share of the cost is known is recomputed instead, which is cheaper).
  Entries no other group permutes (biases, norm weights, the first layer's inputs) are multiplied
  once, into a fixed part of the cost. A small group, where this bookkeeping would cost more than the
  arithmetic, is recomputed as one matmul of all its entries stacked, the fixed ones included;
* every LAP is solved on its cost reduced by the row minima and then by the column minima: the same
  optimal assignment, since a constant per row or per column changes every assignment's total
  equally, but scipy's shortest-augmenting-path solver then assigns many rows at once (it is 1.09×
  to 1.32× faster on the benchmark pairs' costs; ``experiments/benchmarks/lap_solves.py``);
* a group of at least ``_WARM`` units also keeps column prices from its previous solve, refined by
  one Bellman–Ford relaxation against that solve's assignment (they converge to the LAP's duals),
  and its next solve runs on the cost minus these prices (the same optimum again). On a trained
  MLP's costs, which change little between solves, the solver is then a further 2.5× faster; on
  random VGG-16 weights, whose costs change a lot, 15% slower. Smaller groups gain nothing from
  prices (ResNet-20 ×1), and the relaxation has its own cost;
* a move is accepted only if it gains; a gain too small to trust given the rounding of the kept costs
  is re-evaluated exactly, in float64, over the units that move;
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
    """One state-dict entry that a group acts on and another group permutes on another axis."""

    a: torch.Tensor  # (n, *rest): A's entry with the group's axis (n blocks) first, other axes unflattened
    b: torch.Tensor  # (n, *rest): the same for B
    others: list[tuple[int, str, int]]  # (axis in a/b, group, block) of the other permuted axes
    used: list[torch.Tensor] | None = None  # the other groups' permutations the group's cost reflects
    cost: torch.Tensor | None = None  # this term's share of that cost, while known (see _Group.current_cost)

    def full(self, perm: Permutation, n: int) -> torch.Tensor:
        """Its share of the cost for ``perm``, computed in full (float64, on CPU)."""
        return (self.a.reshape(n, -1) @ _permuted_b(self, perm).reshape(n, -1).T).double().cpu()

    def update(self, old: torch.Tensor, new: torch.Tensor, units: torch.Tensor, n: int) -> torch.Tensor:
        """The change of its share when its one other axis's permutation goes from ``old`` to ``new``:
        ``A_K (B_new_K − B_old_K)ᵀ`` over the units K where they differ."""
        (axis, _, block), dev = self.others[0], self.b.device
        a_k = self.a.index_select(axis, _expand(units, block).to(dev)).reshape(n, -1)
        b_new = self.b.index_select(axis, _expand(new[units], block).to(dev)).reshape(n, -1)
        b_old = self.b.index_select(axis, _expand(old[units], block).to(dev)).reshape(n, -1)
        return (a_k @ (b_new - b_old).T).cpu()  # added in place to a float64 cost


@dataclass
class _Group:
    """Everything one group's cost matrix is made of, and that matrix for the permutations last seen."""

    n: int
    fixed: list[tuple[torch.Tensor, torch.Tensor]]  # (A, B) as (n, m) of entries no other group permutes
    terms: list[_Term]
    deps: list[str]  # the other groups its cost depends on
    fixed_cost: torch.Tensor | None = None  # a large group's fixed entries' share: (n, n) float64 on CPU
    small: bool | None = None  # recomputed in one matmul each time (bookkeeping would cost more)
    stacked_a: torch.Tensor | None = None  # a small group's A, terms then fixed entries side by side: (n, M)
    fixed_b: list[torch.Tensor] | None = None  # a small group's fixed B entries side by side (none or one)
    cost: torch.Tensor | None = None  # a large group's (n, n) cost, kept up to date (float64, CPU)

    def current_cost(self, perm: Permutation) -> torch.Tensor:
        """The cost for ``perm``. A small group's cost is recomputed as one matmul of its stacked entries,
        the fixed ones included. A large group's fixed entries are multiplied once, and its terms computed
        in full on first use and afterwards only where other groups moved: a term with one other permuted
        axis is updated over the moved units, unless more than ``_PART`` of them moved and its share of
        the cost is known (kept from its last full computation in groups of up to ``_KEEP`` units, where
        it costs little memory), in which case it is recomputed; a term with several is recomputed."""
        n = self.n
        if self.small is None:
            self.small = sum(t.a.numel() for t in self.terms) * n <= _SMALL
            if self.small:  # the fixed entries go last, as columns that are never permuted
                self.stacked_a = torch.cat([t.a.reshape(n, -1) for t in self.terms] + [a for a, _ in self.fixed], 1)
                self.fixed_b = [torch.cat([b for _, b in self.fixed], 1)] if self.fixed else []
            else:
                self.fixed_cost = torch.zeros(n, n, dtype=torch.float64)
                if self.fixed:
                    a, b = (torch.cat(x, 1) for x in zip(*self.fixed))
                    self.fixed_cost += (a @ b.T).double().cpu()
        if self.small:
            bs = [_permuted_b(t, perm).reshape(n, -1) for t in self.terms] + self.fixed_b
            return (self.stacked_a @ (bs[0] if len(bs) == 1 else torch.cat(bs, 1)).T).double().cpu()
        if self.cost is None:
            self.cost = self.fixed_cost.clone()
            for t in self.terms:
                c = t.full(perm, n)
                self.cost += c
                t.used = [perm[o] for _, o, _ in t.others]
                if len(t.others) > 1 or n <= _KEEP:
                    t.cost = c
            return self.cost
        for t in self.terms:
            now = [perm[o] for _, o, _ in t.others]
            if all(p is q for p, q in zip(now, t.used)):
                continue
            units = torch.nonzero(t.used[0] != now[0]).flatten() if len(now) == 1 else None
            if units is not None and (t.cost is None or len(units) <= _PART * len(now[0])):
                self.cost += t.update(t.used[0], now[0], units, n)
                t.cost = None  # no longer this term's share
            else:
                c = t.full(perm, n)
                self.cost += c - t.cost
                t.cost = c
            t.used = now
        return self.cost


_PART = 0.5  # a term is updated over the moved units if at most this fraction of them moved
_KEEP = 128  # groups up to this size keep each term's share of the cost, to recompute it instead
_SMALL = 1 << 22  # multiply-adds up to which a group's cost is recomputed rather than updated


def _groups(spec: PermutationSpec, a: dict, b: dict, dtype: torch.dtype) -> dict[str, _Group]:
    groups = {}
    for g, refs in spec.perm_to_axes.items():
        n, fixed, terms = spec.sizes[g], [], []
        for ref in refs:
            if ref.key not in a or ref.key not in b:
                continue
            wa, wb = a[ref.key], b[ref.key]
            if wa.dtype != dtype:
                wa, wb = wa.to(dtype), wb.to(dtype)
            others = [(axis + 1 if axis < ref.axis else axis, other, spec.block(ref.key, axis))
                      for axis, other in enumerate(spec.axes_to_perm[ref.key])
                      if other is not None and axis != ref.axis]
            if ref.axis:
                wa, wb = wa.movedim(ref.axis, 0), wb.movedim(ref.axis, 0)
            if not others:
                fixed.append((wa.reshape(n, -1), wb.reshape(n, -1)))
                continue
            if spec.block(ref.key, ref.axis) > 1:
                wa, wb = wa.reshape(n, -1, *wa.shape[1:]), wb.reshape(n, -1, *wb.shape[1:])
                others = [(axis + 1, other, blk) for axis, other, blk in others]
            terms.append(_Term(wa.contiguous(), wb.contiguous(), others))
        if fixed or terms:
            groups[g] = _Group(n, fixed, terms, sorted({o for t in terms for _, o, _ in t.others}))
    return groups


def _permuted_b(term: _Term, perm: Permutation, rows: torch.Tensor | None = None) -> torch.Tensor:
    """B's entry (its ``rows`` only, if given) with every other permuted axis permuted by ``perm``."""
    wb = term.b if rows is None else term.b.index_select(0, rows.to(term.b.device))
    for axis, other, block in term.others:
        wb = wb.index_select(axis, _expand(perm[other], block).to(wb.device))
    return wb


def _exact_gain(group: _Group, perm: Permutation, rows: torch.Tensor, new: torch.Tensor,
                old: torch.Tensor) -> float:
    """``Σ_{i∈rows} C[i, new_i] − C[i, old_i]`` computed afresh in float64 (only the moving units)."""
    gain = 0.0
    pairs = [(a, b, None) for a, b in group.fixed] + [(t.a, t.b, t) for t in group.terms]
    for a, b, t in pairs:
        a = a.index_select(0, rows.to(a.device)).double().reshape(len(rows), -1)
        if t is None:
            dev = b.device
            diff = b.index_select(0, new[rows].to(dev)).double() - b.index_select(0, old[rows].to(dev)).double()
        else:
            diff = _permuted_b(t, perm, new[rows]).double() - _permuted_b(t, perm, old[rows]).double()
        gain += float((a * diff.reshape(len(rows), -1)).sum())
    return gain


_WARM = 128  # groups at least this large carry column prices from one assignment to the next


def _assign(cost: np.ndarray, prices: np.ndarray | None = None, relax: bool = False):
    """The max-weight assignment of ``cost``, and (if ``relax``) refined column prices for the next solve.

    The solve minimises ``k = −cost − prices`` (the same optimum), reduced by its row minima and then
    by its column minima (the same optimum again), which lets the shortest-augmenting-path solver
    assign many rows at once. One Bellman–Ford relaxation over the assignment found moves the prices
    toward LAP duals of this cost: ``p_j += min_i k_ij − k_i,col_i``.
    """
    gain = cost if prices is None else cost + prices  # −k
    reduced = gain.max(1, keepdims=True) - gain
    reduced -= reduced.min(0)
    _, col = linear_sum_assignment(reduced)
    if not relax:
        return col, None
    step = (gain[np.arange(len(col)), col][:, None] - gain).min(0)
    prices = step if prices is None else prices + step
    return col, prices - prices.max()  # only differences matter; keep them from drifting


@torch.no_grad()
def cost_matrices(
    spec: PermutationSpec, perm: Permutation, params_a: dict, params_b: dict, dtype: torch.dtype = torch.float64
) -> dict[str, torch.Tensor]:
    """Every group's ``(n, n)`` weight-matching cost ``C[i, j]`` = similarity of A's unit i and B's unit j,
    with the other groups permuted by ``perm`` (float64, on CPU)."""
    return {g: group.current_cost(perm) for g, group in _groups(spec, params_a, params_b, dtype).items()}


@torch.no_grad()
def weight_matching(
    spec: PermutationSpec,
    params_a: dict[str, torch.Tensor],
    params_b: dict[str, torch.Tensor],
    max_iter: int = 100,
    seed: int = 0,
    init_perm: Permutation | None = None,
    dtype: torch.dtype = torch.float32,
    warm_start: dict[str, np.ndarray] | None = None,
) -> Permutation:
    """The permutation of B that best matches A's weights (Git Re-Basin's weight matching).

    ``params_a``/``params_b`` map state-dict keys to tensors (typically the models' parameters; pass
    buffers too only if they should count in the objective). ``dtype`` is the matmul precision of the
    cost matrices (accumulated in float64; gains near their rounding are re-checked in float64).
    ``warm_start``: a dict the caller keeps across calls on slowly changing weights, with ``init_perm``
    the previous result (as the straight-through estimator does at every step). The column prices of
    each group's assignments are kept in it, and the next call starts from them. The optima are the
    same, and they are found sooner.
    Returns ``{group: LongTensor}``; apply it to B with :func:`lmc.apply_permutation`.
    """
    groups = _groups(spec, params_a, params_b, dtype)
    perm = identity_permutation(spec) if init_perm is None else {g: p.clone().cpu() for g, p in init_perm.items()}
    names = [g for g in spec.perm_to_axes if g in groups]
    version = dict.fromkeys(spec.sizes, 0)  # bumped whenever a group's permutation changes
    solved_at: dict[str, tuple[int, ...]] = {}  # versions of a group's deps at its last assignment
    prices: dict[str, np.ndarray] = {} if warm_start is None else warm_start
    for g in [g for g, p in prices.items() if len(p) != spec.sizes.get(g)]:
        del prices[g]  # not this spec's group (any more)
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        progress = False
        for gi in rng.permutation(len(names)):
            g, group = names[gi], groups[names[gi]]
            state = tuple(version[o] for o in group.deps)
            if solved_at.get(g) == state:
                continue  # same cost matrix as at this group's last assignment: no improvement possible
            c = group.current_cost(perm).numpy()
            col, new_prices = _assign(c, prices.get(g), relax=group.n >= _WARM)
            if new_prices is not None:
                prices[g] = new_prices
            solved_at[g] = state
            current = perm[g].numpy()
            rows = np.flatnonzero(col != current)
            if not len(rows):
                continue
            gain = c[rows, col[rows]].sum() - c[rows, current[rows]].sum()
            scale = max(1.0, max(c.max(), -c.min()) * len(col))
            if gain <= 1e-5 * scale:  # within rounding of the kept costs: evaluate the move exactly
                gain = _exact_gain(group, perm, torch.from_numpy(rows), torch.from_numpy(col), perm[g])
            if gain > 1e-12 * scale:
                progress = True
                perm[g] = torch.from_numpy(col).long()
                version[g] += 1
        if not progress:
            break
    return perm
