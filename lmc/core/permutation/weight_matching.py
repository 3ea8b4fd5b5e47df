"""Weight matching (Ainsworth, Hayase & Srinivasa, "Git Re-Basin", 2023, Algorithm 1).

Maximise ``Σ_keys <W_A, π(W_B)>`` over permutations ``π`` by coordinate descent: visit the groups in
a random order; for each group, with all other groups fixed, the objective is linear in that group's
permutation matrix, so the best one is a linear assignment problem (LAP,
:func:`scipy.optimize.linear_sum_assignment`). Repeat until a full pass improves no group.

The algorithm is the reference's; the work is organised to avoid repeating it:

* a group's ``(n, n)`` cost is computed when it is first solved (float32 matmuls by default,
  accumulated in float64) and afterwards only where other groups moved: rows of B whose other axis's
  permutation changed at units K give ``ΔC = A_K (B_new_K − B_old_K)ᵀ``, a matmul over K alone, so
  late passes, which move few units, cost little; where most rows moved, the cost is recomputed;
* a group of up to ``_STACK`` elements (ResNet-20 ×1, the first layers of wider nets) is *stacked*
  (:class:`_Group`): all its entries side by side, once, in A's ``(n, M)`` and in B's ``(M, n)`` row
  layout, in an order derived once per spec (:class:`_Layout`, cached on the spec). The other groups'
  permutations then only reorder whole rows of B, by one index computed in a few numpy operations,
  and the cost is one gather and one matmul (none but the matmul while they are the identity). At
  this size the arithmetic is small and every tensor operation's overhead counts: numpy does the
  index arithmetic and the transposing copies, torch the gather and the matmul, into a buffer numpy
  reads in place. A larger group (:class:`_LargeGroup`) keeps its entries as they are (views where
  possible: stacking would copy both models whole), multiplies the entries no other group permutes
  once, and keeps each other entry's share of the cost (in groups of up to ``_KEEP`` units) to
  recompute it when most of its units moved;
* every LAP of a group of at least ``_REDUCE`` units is solved on its cost reduced by the row minima
  and then by the column minima: the same optimal assignment, since a constant per row or per column
  changes every assignment's total equally, but scipy's shortest-augmenting-path solver then assigns
  many rows at once (1.09× to 1.32× faster on the benchmark pairs' costs;
  ``experiments/benchmarks/lap_solves.py``); for smaller ones the reductions cost more than they save;
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

Inside, permutations are numpy arrays; the result is ``{group: LongTensor}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from lmc.core.permutation.apply import Permutation, _expand, apply_permutation
from lmc.core.permutation.spec import PermutationSpec
from lmc.errors import ConfigError

__all__ = ["MatchingRuns", "WM_INITS", "cost_matrices", "matching_objective", "restart_seeds", "sequential_start",
           "weight_matching", "weight_matching_restarts"]


def matching_objective(
    spec: PermutationSpec, perm: Permutation, params_a: dict[str, torch.Tensor], params_b: dict[str, torch.Tensor]
) -> float:
    """``Σ_keys <W_A, π(W_B)>`` over the spec's permuted entries present in both dicts (float64)."""
    params_a, params_b = spec.entries(params_a), spec.entries(params_b)
    keys = [k for k in params_a if k in params_b and any(g is not None for g in spec.axes_to_perm.get(k, ()))]
    permuted = apply_permutation(spec, perm, {k: params_b[k].detach() for k in keys})
    return float(sum(torch.vdot(params_a[k].detach().double().flatten(), permuted[k].double().flatten())
                     for k in keys))


def _f64(t: torch.Tensor) -> np.ndarray:
    return t.cpu().numpy().astype(np.float64)


@dataclass(frozen=True)
class _Term:
    """Where one state-dict entry a group acts on sits in the group's stacks: rows ``start:stop``.

    The entry, its blocks split, is stored in A's stack with the group's units first, then its other axes
    flattened in C order, and in B's row stack with the same axes, the group's units last. The group's
    vectors (biases, norm weights: entries of shape ``(n,)``) are one term of one row each (``keys``; no
    copy recipes), copied by one stack.
    """

    keys: tuple[str, ...]
    start: int
    stop: int
    a_copy: tuple | None  # (source shape, its transpose, the stack's view): A's entry into the stack, dims merged
    b_copy: tuple | None  # the same for B's


@dataclass(frozen=True)
class _Layout:
    """How one group's stacks are laid out, and how their rows follow the other groups' permutations: for
    permutations π, row r of ``π(B)ᵀ`` is B's row ``base[r] + Σ_d π_cat[pos[d, r]]·stride[d, r]``, where
    ``π_cat`` is the permutations of ``deps`` one after another and a last 0 (for rows with fewer than
    ``d`` permuted axes). One expression for all rows: the index costs a few array operations a solve,
    whatever the number of entries."""

    n: int
    size: int  # M, the rows of the stacks
    terms: list[_Term]
    deps: tuple[str, ...]  # the other groups the cost depends on
    base: np.ndarray  # (M,)
    pos: np.ndarray  # (D, M) int64
    stride: np.ndarray  # (D, M) int64

    def index(self, perm: dict[str, np.ndarray]) -> np.ndarray:
        """B's row of each row of ``π(B)ᵀ`` for ``perm``."""
        if not self.deps:
            return self.base
        cat = np.concatenate([perm[g] for g in self.deps] + [_ZERO])
        if len(self.pos) == 1:
            return self.base + cat[self.pos[0]] * self.stride[0]
        return self.base + (cat[self.pos] * self.stride).sum(0)


_ZERO = np.zeros(1, dtype=np.int64)


def _plan(spec: PermutationSpec, a: dict, b: dict) -> dict[str, _Layout]:
    """Every group's :class:`_Layout`. It depends only on the spec and the shapes of the entries present
    in both dicts, so it is made once per spec and those shapes."""
    shapes = tuple((k, a[k].shape) for k in spec.axes_to_perm if k in a and k in b)
    cache = spec.derived.setdefault("weight_matching_layouts", {})
    if shapes not in cache:
        memo = {}  # entries of one shape share their place in the stacks (see _entry_layout)
        layouts = ((g, _layout(spec, g, dict(shapes), memo)) for g in spec.perm_to_axes)
        cache[shapes] = {g: layout for g, layout in layouts if layout.terms}
    return cache[shapes]


def _layout(spec: PermutationSpec, g: str, shapes: dict, memo: dict) -> _Layout:
    n, terms, size, vectors, rows = spec.sizes[g], [], 0, [], []  # rows: per term, (base, [(group, unit, stride)])
    for ref in spec.perm_to_axes[g]:
        if ref.key not in shapes:
            continue
        if shapes[ref.key] == (n,):
            vectors.append(ref.key)
            continue
        axes = spec.axes_to_perm[ref.key]
        others = [other for axis, other in enumerate(axes) if other is not None and axis != ref.axis]
        key = (shapes[ref.key], ref.axis, n, tuple(spec.block(ref.key, axis) for axis in range(len(axes))),
               tuple(other is not None and axis != ref.axis for axis, other in enumerate(axes)))
        if key not in memo:
            memo[key] = _entry_layout(*key)
        a_copy, b_copy, m, base, units = memo[key]
        rows.append((base + size, [(other, unit, stride) for other, (unit, stride) in zip(others, units)]))
        terms.append(_Term((ref.key,), size, size + m, a_copy, b_copy))
        size += m
    if vectors:
        rows.append((np.arange(size, size + len(vectors)), []))
        terms.append(_Term(tuple(vectors), size, size + len(vectors), None, None))
        size += len(vectors)
    deps = tuple(sorted({o for _, moved in rows for o, _, _ in moved}))
    offset = dict(zip(deps, np.cumsum([0] + [spec.sizes[d] for d in deps]).tolist()))
    depth = max((len(moved) for _, moved in rows), default=0)
    pos = np.full((depth, size), sum(spec.sizes[d] for d in deps), dtype=np.int64)  # the trailing 0
    stride = np.zeros((depth, size), dtype=np.int64)
    base = np.concatenate([b for b, _ in rows]) if rows else np.zeros(0, dtype=np.int64)
    at = 0
    for b_rows, moved in rows:
        for d, (other, unit_of_row, step) in enumerate(moved):
            pos[d, at:at + len(b_rows)] = offset[other] + unit_of_row
            stride[d, at:at + len(b_rows)] = step
        at += len(b_rows)
    return _Layout(n, size, terms, deps, base, pos, stride)


def _entry_layout(shape: tuple[int, ...], axis: int, n: int, blocks: tuple[int, ...], permuted: tuple[bool, ...]):
    """One entry's place in its group's stacks, from its shape and which of its other axes other groups
    permute (it depends on nothing else, so entries of one shape share it): its copy recipes into A's and
    B's stacks, its rows M, each row's B row with every permuted axis at unit 0 (from row 0), and per
    permuted axis each row's unit of it and that axis's stride."""
    split, inner_axes, dims = [], [], []
    for ax, length in enumerate(shape):
        block = blocks[ax]
        if ax == axis:
            unit = len(split)
            length = n * block  # its blocks, if any, are an inner axis like any other
        elif permuted[ax]:
            dims.append(len(inner_axes))
        split += [length // block, block] if block > 1 else [length]
        if ax == axis:
            inner_axes += [unit + 1] if block > 1 else []
        else:
            inner_axes += [len(split) - 2, len(split) - 1] if block > 1 else [len(split) - 1]
    inner = [split[i] for i in inner_axes]
    m = math.prod(inner)
    r, base, units = np.arange(m), np.arange(m), []
    for j in dims:
        stride = math.prod(inner[j + 1:])
        unit_of_row = r // stride % inner[j]
        base = base - unit_of_row * stride
        units.append((unit_of_row, stride))
    split, inner_axes = tuple(split), tuple(inner_axes)
    return (_recipe(split, ((unit,), inner_axes)), _recipe(split, ((*inner_axes, unit),)), m, base, units)


def _recipe(shape: tuple[int, ...], parts: tuple[tuple[int, ...], ...]) -> tuple:
    """How to copy an array of ``shape`` into a C-contiguous destination whose axes are ``shape``'s in the
    order ``parts`` (concatenated; no two parts merge), with as few axes as possible: axes that stay
    neighbours are merged (numpy and torch copy slowly along short innermost axes, e.g. a 3×3 kernel's).
    Returns (the source's merged shape, the transpose of it, the destination's merged shape)."""
    runs = []  # runs of consecutive source axes, in destination order
    for part in parts:
        for i, axis in enumerate(part):
            if i and axis == runs[-1][-1] + 1:
                runs[-1].append(axis)
            else:
                runs.append([axis])
    by_source = sorted(range(len(runs)), key=lambda r: runs[r][0])
    sizes = [math.prod(shape[axis] for axis in run) for run in runs]
    return (tuple(sizes[r] for r in by_source), tuple(by_source.index(r) for r in range(len(runs))), tuple(sizes))


class _Group:
    """One group's cost matrix ``C = A · π(B)ᵀ`` and what it is made of.

    Every entry the group acts on is laid out once, side by side (see :class:`_Layout`): ``a`` is A's
    ``(n, M)``, the group's units as rows and the entries' other axes flattened into the columns;
    ``rows`` is B's ``(M, n)`` in the same order, the group's units as columns. The other groups'
    permutations then only reorder whole rows of ``rows`` (``idx``: the row of B each row of ``π(B)ᵀ``
    is): a gather of contiguous memory, none at all while they are the identity, and one matmul.
    Permutations here are numpy arrays.
    """

    def __init__(self, layout: _Layout, a: torch.Tensor, rows: torch.Tensor, out: torch.Tensor | None = None,
                 out_np: np.ndarray | None = None):
        self.layout, self.n, self.a, self.rows, self.deps = layout, layout.n, a, rows, layout.deps
        self.idx: np.ndarray | None = None  # B's rows of π(B)ᵀ for the permutations of the last cost
        self.cost: np.ndarray | None = None  # (n, n) float64 for those permutations
        # on the CPU, matmuls write into an (n, n) buffer (shared by the groups of this size) that numpy reads
        # without a conversion per product
        self.out, self.out_np = out, out_np

    def current_cost(self, perm: dict[str, np.ndarray], identity: frozenset | set = frozenset()) -> np.ndarray:
        """The cost for ``perm`` (``identity``: groups whose permutation is known to be the identity).
        Computed in full on first use, or when more than ``_PART`` of the rows moved since; otherwise
        updated over the moved rows K: ``ΔC = A_K (B_new_K − B_old_K)ᵀ``, a matmul over K alone."""
        idx = self.layout.index(perm)
        if self.cost is not None:
            k = np.flatnonzero(idx != self.idx)
            if len(k) <= _PART * len(idx):
                if len(k):
                    rows = self.rows
                    diff = rows.index_select(0, self._on(idx[k])) - rows.index_select(0, self._on(self.idx[k]))
                    self.cost += self._product(self.a.index_select(1, self._on(k)), diff)
                self.idx = idx
                return self.cost
        self.idx = idx
        identical = all(g in identity for g in self.deps)
        product = self._product(self.a, self.rows if identical else self.permuted_bt(idx))
        self.cost = product.astype(np.float64) if product is self.out_np else product
        return self.cost

    def exact_gain(self, perm: dict[str, np.ndarray], rows: np.ndarray, new: np.ndarray, old: np.ndarray) -> float:
        """``Σ_{i∈rows} C[i, new_i] − C[i, old_i]`` computed afresh in float64 (only the moving units)."""
        bt = self.permuted_bt(self.layout.index(perm))
        diff = bt.index_select(1, self._on(new[rows])).double() - bt.index_select(1, self._on(old[rows])).double()
        return float((self.a.index_select(0, self._on(rows)).double() * diff.T).sum())

    def permuted_bt(self, idx: np.ndarray) -> torch.Tensor:
        """``π(B)ᵀ`` as ``(M, n)``, for B's rows ``idx``."""
        return self.rows.index_select(0, self._on(idx))

    def _on(self, idx: np.ndarray) -> torch.Tensor:
        idx = torch.from_numpy(idx)
        return idx if self.out is not None else idx.to(self.rows.device)

    def _product(self, a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
        """``a @ b`` as numpy: on the CPU, the ``(n, n)`` buffer the groups of this size share (valid until the
        next product, so read at once); elsewhere a float64 copy."""
        if self.out is None:
            return (a @ b).double().cpu().numpy()
        torch.mm(a, b, out=self.out)
        return self.out_np


_PART = 0.5  # a cost is updated over the moved rows if at most this fraction of them moved


@dataclass
class _Entry:
    """(A large group's) state-dict entry that the group acts on and other groups permute on other axes."""

    a: torch.Tensor  # (n, *rest): A's entry with the group's axis (n blocks) first, other axes unflattened
    b: torch.Tensor  # (n, *rest): the same for B
    others: list[tuple[int, str, int]]  # (axis in a/b, group, block) of the other permuted axes
    used: list[np.ndarray] | None = None  # the other groups' permutations the group's cost reflects
    cost: np.ndarray | None = None  # this entry's share of that cost, while known (see _LargeGroup.current_cost)

    def full(self, perm: dict[str, np.ndarray], n: int) -> np.ndarray:
        """Its share of the cost for ``perm``, computed in full (float64)."""
        return _f64(self.a.reshape(n, -1) @ self.permuted_b(perm).reshape(n, -1).T)

    def update(self, old: np.ndarray, new: np.ndarray, units: np.ndarray, n: int) -> np.ndarray:
        """The change of its share when its one other axis's permutation goes from ``old`` to ``new``:
        ``A_K (B_new_K − B_old_K)ᵀ`` over the units K where they differ."""
        (axis, _, block), dev = self.others[0], self.b.device
        a_k = self.a.index_select(axis, _units(units, block, dev)).reshape(n, -1)
        b_new = self.b.index_select(axis, _units(new[units], block, dev)).reshape(n, -1)
        b_old = self.b.index_select(axis, _units(old[units], block, dev)).reshape(n, -1)
        return _f64(a_k @ (b_new - b_old).T)

    def permuted_b(self, perm: dict[str, np.ndarray], rows: np.ndarray | None = None) -> torch.Tensor:
        """B's entry (its ``rows`` only, if given) with every other permuted axis permuted by ``perm``."""
        wb = self.b if rows is None else self.b.index_select(0, _units(rows, 1, self.b.device))
        for axis, other, block in self.others:
            wb = wb.index_select(axis, _units(perm[other], block, wb.device))
        return wb


def _units(p: np.ndarray, block: int, dev: torch.device) -> torch.Tensor:
    return _expand(torch.from_numpy(p), block).to(dev)


class _LargeGroup:
    """A group too large to stack (more than ``_STACK`` elements): its entries are kept as they are (views
    where possible), its fixed entries multiplied once, and each other entry's share of the cost computed
    in full on first use and afterwards only where other groups moved: an entry with one other permuted
    axis is updated over the moved units, unless more than ``_PART`` of them moved and its share of the
    cost is known (kept in groups of up to ``_KEEP`` units), in which case it is recomputed; an entry with
    several is recomputed. At this size the arithmetic outweighs the operations' overhead, and stacking
    would copy both models whole."""

    def __init__(self, n: int, fixed: list[tuple[torch.Tensor, torch.Tensor]], terms: list[_Entry]):
        self.n, self.fixed, self.terms = n, fixed, terms
        self.deps = sorted({o for t in terms for _, o, _ in t.others})
        self.cost: np.ndarray | None = None  # (n, n) float64, kept up to date

    def current_cost(self, perm: dict[str, np.ndarray], identity: frozenset | set = frozenset()) -> np.ndarray:
        n = self.n
        if self.cost is None:
            self.cost = np.zeros((n, n))
            if self.fixed:
                a, b = (torch.cat(x, 1) for x in zip(*self.fixed))
                self.cost += _f64(a @ b.T)
            for t in self.terms:
                c = t.full(perm, n)
                self.cost += c
                t.used = [perm[o] for _, o, _ in t.others]
                t.cost = c if len(t.others) > 1 or n <= _KEEP else None
            return self.cost
        for t in self.terms:
            now = [perm[o] for _, o, _ in t.others]
            if all(p is q for p, q in zip(now, t.used)):
                continue
            units = np.flatnonzero(t.used[0] != now[0]) if len(now) == 1 else None
            if units is not None and (t.cost is None or len(units) <= _PART * len(now[0])):
                self.cost += t.update(t.used[0], now[0], units, n)
                t.cost = None  # no longer this entry's share
            else:
                c = t.full(perm, n)
                self.cost += c - t.cost
                t.cost = c
            t.used = now
        return self.cost

    def exact_gain(self, perm: dict[str, np.ndarray], rows: np.ndarray, new: np.ndarray, old: np.ndarray) -> float:
        """``Σ_{i∈rows} C[i, new_i] − C[i, old_i]`` computed afresh in float64 (only the moving units)."""
        gain = 0.0
        for a, b, t in [(a, b, None) for a, b in self.fixed] + [(t.a, t.b, t) for t in self.terms]:
            a = a.index_select(0, _units(rows, 1, a.device)).double().reshape(len(rows), -1)
            if t is None:
                dev = b.device
                diff = b.index_select(0, _units(new[rows], 1, dev)).double() - b.index_select(
                    0, _units(old[rows], 1, dev)).double()
            else:
                diff = t.permuted_b(perm, new[rows]).double() - t.permuted_b(perm, old[rows]).double()
            gain += float((a * diff.reshape(len(rows), -1)).sum())
        return gain


def _large_group(spec: PermutationSpec, g: str, a: dict, b: dict, dtype: torch.dtype) -> _LargeGroup:
    n, fixed, terms = spec.sizes[g], [], []
    for ref in spec.perm_to_axes[g]:
        if ref.key not in a or ref.key not in b:
            continue
        wa, wb = a[ref.key].detach(), b[ref.key].detach()
        if wa.dtype != dtype:
            wa, wb = wa.to(dtype), wb.to(dtype)
        others = [(axis + 1 if axis < ref.axis else axis, other, spec.block(ref.key, axis))
                  for axis, other in enumerate(spec.axes_to_perm[ref.key]) if other is not None and axis != ref.axis]
        if ref.axis:
            wa, wb = wa.movedim(ref.axis, 0), wb.movedim(ref.axis, 0)
        if not others:
            fixed.append((wa.reshape(n, -1), wb.reshape(n, -1)))
            continue
        if spec.block(ref.key, ref.axis) > 1:
            wa, wb = wa.reshape(n, -1, *wa.shape[1:]), wb.reshape(n, -1, *wb.shape[1:])
            others = [(axis + 1, other, blk) for axis, other, blk in others]
        terms.append(_Entry(wa.contiguous(), wb.contiguous(), others))
    return _LargeGroup(n, fixed, terms)


_KEEP = 128  # large groups up to this size keep each entry's share of the cost, to recompute it instead
_STACK = 1 << 18  # groups whose stacks have up to this many elements are stacked (see _Group)


def _groups(spec: PermutationSpec, a: dict, b: dict, dtype: torch.dtype) -> dict[str, _Group | _LargeGroup]:
    groups = {}
    plans = {}
    for g, layout in _plan(spec, a, b).items():
        if layout.n * layout.size <= _STACK:
            plans[g] = layout
        else:
            groups[g] = _large_group(spec, g, a, b, dtype)
    keys = {k for layout in plans.values() for t in layout.terms for k in t.keys}
    a, b = ({k: d[k].detach() if d[k].requires_grad else d[k] for k in keys} for d in (a, b))
    dev = next(iter(a.values())).device if a else torch.device("cpu")
    host = dev.type == "cpu" and dtype in _NUMPY
    if host:  # numpy's reshapes and transposing copies cost a fraction of torch's on small arrays
        try:
            a, b = ({k: x.numpy() for k, x in d.items()} for d in (a, b))
        except TypeError:  # a dtype numpy lacks (bfloat16): torch copies
            host = False
    products = {}  # n -> the (n, n) buffer CPU matmuls write into (a group reads it before the next product)
    for g, layout in plans.items():
        n, size, terms = layout.n, layout.size, layout.terms
        # allocated by torch: numpy's allocations of this size page-fault afresh on every call, 10x slower
        a_stack, rows = torch.empty(n, size, dtype=dtype, device=dev), torch.empty(size, n, dtype=dtype, device=dev)
        dst_a, dst_rows = (a_stack.numpy(), rows.numpy()) if host else (a_stack, rows)
        for t in terms:
            if t.a_copy is None:  # the vectors, one row each
                _stack(dst_a[:, t.start:t.stop], [a[k] for k in t.keys], 1)
                _stack(dst_rows[t.start:t.stop], [b[k] for k in t.keys], 0)
            else:
                _copy(dst_a[:, t.start:t.stop], a[t.keys[0]], t.a_copy)
                _copy(dst_rows[t.start:t.stop], b[t.keys[0]], t.b_copy)
        if n not in products and host:
            out = torch.empty(n, n, dtype=dtype)
            products[n] = out, out.numpy()
        groups[g] = _Group(layout, a_stack, rows, *products.get(n, (None, None)))
    return {g: groups[g] for g in spec.perm_to_axes if g in groups}


def _copy(dst, src, recipe: tuple) -> None:
    """Copy ``src`` into ``dst`` (numpy arrays or tensors) as ``recipe`` says (see :func:`_recipe`)."""
    shape, order, view = recipe
    if isinstance(dst, np.ndarray):
        dst.shape = view  # raises if it cannot be a view
        np.copyto(dst, src.reshape(shape).transpose(order))
    else:
        dst.view(view).copy_(src.reshape(shape).permute(order))


def _stack(dst, parts: list, axis: int) -> None:
    if isinstance(dst, np.ndarray):
        np.stack(parts, axis, out=dst)
    else:
        dst.copy_(torch.stack(parts, axis))


_NUMPY = (torch.float32, torch.float64)


_WARM = 128  # groups at least this large carry column prices from one assignment to the next
_REDUCE = 48  # groups at least this large reduce their costs before the solve (smaller ones gain less)


def _assign(cost: np.ndarray, prices: np.ndarray | None = None, relax: bool = False):
    """The max-weight assignment of ``cost``, and (if ``relax``) refined column prices for the next solve.

    The solve minimises ``k = −cost − prices`` (the same optimum); from ``_REDUCE`` units on, reduced by
    its row minima and then by its column minima (the same optimum again), which lets the
    shortest-augmenting-path solver assign many rows at once. One Bellman–Ford relaxation over the
    assignment found moves the prices toward LAP duals of this cost: ``p_j += min_i k_ij − k_i,col_i``.
    """
    gain = cost if prices is None else cost + prices  # −k
    if len(cost) < _REDUCE:
        _, col = linear_sum_assignment(gain, maximize=True)
    else:
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
    perm = {g: p.cpu().numpy() for g, p in perm.items()}
    return {g: torch.from_numpy(group.current_cost(perm).copy())
            for g, group in _groups(spec, spec.entries(params_a), spec.entries(params_b), dtype).items()}


WM_INITS = ("identity", "sequential")


@torch.no_grad()
def sequential_start(spec: PermutationSpec, params_a: dict, params_b: dict, dtype: torch.dtype = torch.float32
                     ) -> Permutation:
    """A starting permutation placed one group at a time, each by one linear assignment on only the terms whose
    other axes are fixed or already placed: the next group placed is the first (in the spec's order, which is
    the model's) with such a term of more than one axis (a weight, not only a bias or norm vector), or, if none
    has one, the first left, on what it has. Terms through groups not yet placed, which would be noise at
    this stage, are left out. On a permuted copy of a model, every group is placed exactly (its known terms
    are Gram matrices, whose best assignment is the true one), where descent from the identity can settle
    in a wrong local optimum."""
    a, b = spec.entries(params_a), spec.entries(params_b)
    perm: dict[str, torch.Tensor] = {}
    pending = list(spec.perm_to_axes)

    def known(g: str) -> list:
        out = []
        for ref in spec.perm_to_axes[g]:
            if ref.key in a and ref.key in b:
                others = [(axis, o) for axis, o in enumerate(spec.axes_to_perm[ref.key])
                          if o is not None and axis != ref.axis]
                if all(o in perm for _, o in others):
                    out.append((ref, others))
        return out

    while pending:
        g, refs = pending[0], None
        for candidate in pending:
            terms = known(candidate)
            if any(a[ref.key].dim() > 1 for ref, _ in terms):
                g, refs = candidate, terms
                break
        refs = known(g) if refs is None else refs
        n = spec.sizes[g]
        cost = np.zeros((n, n))
        for ref, others in refs:
            wa, wb = a[ref.key].detach(), b[ref.key].detach()
            for axis, other in others:
                wb = wb.index_select(axis, _units(perm[other].numpy(), spec.block(ref.key, axis), wb.device))
            wa, wb = (w.to(dtype).movedim(ref.axis, 0).reshape(n, -1) for w in (wa, wb))
            cost += _f64(wa @ wb.T)
        perm[g] = torch.from_numpy(_assign(cost)[0].astype(np.int64))
        pending.remove(g)
    return perm


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
    init: str = "identity",
    restarts: int = 1,
) -> Permutation:
    """The permutation of B that best matches A's weights (Git Re-Basin's weight matching).

    ``params_a``/``params_b`` map state-dict keys to tensors (typically the models' parameters; pass
    buffers too only if they should count in the objective). ``dtype`` is the matmul precision of the
    cost matrices (accumulated in float64; gains near their rounding are re-checked in float64).
    ``seed`` draws the order in which each pass visits the groups; the local optimum reached depends on it.
    ``init`` is where the descent starts when ``init_perm`` is not given: ``identity`` (Git Re-Basin), or
    ``sequential`` (:func:`sequential_start`).
    ``restarts`` > 1 runs the descent that many times, from the same start, with the group orders of
    :func:`restart_seeds` (the first is ``seed``'s), and keeps the highest objective
    (:func:`weight_matching_restarts` also returns every run's objective).
    ``warm_start``: a dict the caller keeps across calls on slowly changing weights, with ``init_perm``
    the previous result (as the straight-through estimator does at every step). The column prices of
    each group's assignments are kept in it, and the next call starts from them. The optima are the
    same, and they are found sooner.
    Returns ``{group: LongTensor}``; apply it to B with :func:`lmc.apply_permutation`.
    """
    if restarts != 1:
        return weight_matching_restarts(spec, params_a, params_b, restarts, max_iter=max_iter, seed=seed,
                                        init_perm=init_perm, dtype=dtype, warm_start=warm_start, init=init).perm
    if init not in WM_INITS:
        raise ConfigError(f"unknown align.init '{init}'; valid: {', '.join(WM_INITS)}")
    a, b = spec.entries(params_a), spec.entries(params_b)
    if init_perm is None and init == "sequential":
        init_perm = sequential_start(spec, a, b, dtype)
    groups = _groups(spec, a, b, dtype)
    perm = ({g: np.arange(n) for g, n in spec.sizes.items()} if init_perm is None
            else {g: p.cpu().numpy().astype(np.int64) for g, p in init_perm.items()})
    names = [g for g in spec.perm_to_axes if g in groups]
    # groups still at the identity: their terms need no gather
    identity = {g for g, p in perm.items() if init_perm is None or np.array_equal(p, np.arange(len(p)))}
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
            c = group.current_cost(perm, identity)
            col, new_prices = _assign(c, prices.get(g), relax=group.n >= _WARM)
            if new_prices is not None:
                prices[g] = new_prices
            solved_at[g] = state
            current = perm[g]
            rows = np.flatnonzero(col != current)
            if not len(rows):
                continue
            gain = c[rows, col[rows]].sum() - c[rows, current[rows]].sum()
            scale = max(1.0, max(c.max(), -c.min()) * len(col))
            if gain <= 1e-5 * scale:  # within rounding of the kept costs: evaluate the move exactly
                gain = group.exact_gain(perm, rows, col, current)
            if gain > 1e-12 * scale:
                progress = True
                perm[g] = col.astype(np.int64)
                version[g] += 1
                identity.discard(g)
        if not progress:
            break
    return {g: torch.from_numpy(p) for g, p in perm.items()}


def restart_seeds(seed: int, restarts: int) -> list[int]:
    """The group-order seeds of ``restarts`` runs: ``seed`` itself, then seeds derived from (seed, r)."""
    return [seed] + [int(np.random.SeedSequence([seed, r]).generate_state(1)[0]) for r in range(1, restarts)]


@dataclass
class MatchingRuns:
    """Weight matching run several times: the permutation kept, and what every run reached."""

    perm: Permutation  # the run with the highest objective (the first of them on a tie)
    objectives: list[float]  # every run's objective Σ <W_A, π(W_B)>, in order; run 0 is the plain call's
    seeds: list[int]  # every run's group-order seed
    kept: int  # the index of the run kept

    @property
    def objective(self) -> float:
        return self.objectives[self.kept]


@torch.no_grad()
def weight_matching_restarts(
    spec: PermutationSpec,
    params_a: dict[str, torch.Tensor],
    params_b: dict[str, torch.Tensor],
    restarts: int = 1,
    seed: int = 0,
    init: str = "identity",
    init_perm: Permutation | None = None,
    **kwargs,
) -> MatchingRuns:
    """:func:`weight_matching` run ``restarts`` times from one start (``init_perm``, or ``init``'s), with the
    group orders of :func:`restart_seeds` (run 0 is exactly ``weight_matching(..., seed=seed)``); keeps the
    highest objective, so the result is never below run 0's, and is the same for the same ``seed``."""
    if restarts < 1:
        raise ConfigError(f"align.restarts must be a positive integer, got {restarts}")
    if init not in WM_INITS:
        raise ConfigError(f"unknown align.init '{init}'; valid: {', '.join(WM_INITS)}")
    a, b = spec.entries(params_a), spec.entries(params_b)
    if init_perm is None and init == "sequential":  # the same for every run: derived once
        init_perm = sequential_start(spec, a, b, kwargs.get("dtype", torch.float32))
    seeds = restart_seeds(seed, restarts)
    perms = [weight_matching(spec, params_a, params_b, seed=s, init_perm=init_perm, **kwargs) for s in seeds]
    objectives = [matching_objective(spec, p, params_a, params_b) for p in perms]
    kept = int(np.argmax(objectives))
    return MatchingRuns(perms[kept], objectives, seeds, kept)
