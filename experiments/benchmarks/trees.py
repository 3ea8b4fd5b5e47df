"""Weight matching of soft tree ensembles: the vectorised pattern enumeration against two baselines.

    python experiments/benchmarks/trees.py [--trees 256] [--depths 1 2 3] [--kinds perfect oblivious ...]
        [--features 32] [--classes 2] [--repeat 3] [--reference-trees 32] [--threads 1]

Weight matching a tree ensemble (Kanoh & Sugiyama 2025, :mod:`lmc.core.permutation.trees`) scores
every tree of A against every tree of B under every flip/order pattern of a tree (128 for a perfect
tree of depth 3, 48 for an oblivious one), then solves one linear assignment. Three ways to compute the
same result, timed in this process on the same two random ensembles (independent initialisations, the
parameters spread by a normal draw; float32):

* ``lmc``: :meth:`TreeSymmetry.weight_matching` with ``search="enumerate"`` — the inner products of all
  tree pairs over every (node, node) and (leaf, leaf) pair some pattern uses, by one batched matmul,
  then all patterns at once by one matmul with the pattern matrix; for perfect trees also the default
  ``search="auto"`` (``recursive`` column), which finds each pair's best flips bottom-up instead of
  enumerating them (the same result);
* ``pattern loop``: a loop over the patterns; each transforms all of B's trees (``apply``) and scores
  them against all of A's by one matmul of the weighted, flattened parameters (vectorised over tree
  pairs, not over patterns), keeping the running best;
* ``plain``: loops over tree pairs × patterns, one tree transformed and scored at a time (the tests'
  reference), at ``--reference-trees`` trees (its time grows with their square); ``lmc`` is timed
  again at that size for its ratio.

The script checks that every way reaches the same assignment total. ``ratio`` = baseline time / lmc
time (> 1: lmc is faster); each time is the best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import time

import torch
from scipy.optimize import linear_sum_assignment

from lmc.core.models.trees import SoftTreeEnsemble
from lmc.core.permutation.trees import TREE_KINDS, TreeSymmetry, TreeTransform


def _ensemble(kind: str, depth: int, trees: int, features: int, classes: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = SoftTreeEnsemble((features,), classes, trees=trees, depth=depth, kind=kind)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return {k: v.detach() for k, v in model.state_dict().items()}


def _weighted(sym: TreeSymmetry, sd: dict) -> torch.Tensor:
    """``(M, K)``: each tree's parameters flattened, every node's ``(w, b)`` times √(leaves it affects)."""
    omega = sym.node_weights().to(sd["split_weight"].dtype)
    nodes = torch.cat([sd["split_weight"], sd["split_bias"][..., None]], -1) * omega[:, None]
    return torch.cat([nodes.flatten(1), sd["leaf_value"].flatten(1)], 1)


def pattern_loop(sym: TreeSymmetry, sd_a: dict, sd_b: dict) -> TreeTransform:
    flips, order = sym.shape.patterns(("perm", "flip", "order"))
    M = sym.trees
    flat_a = _weighted(sym, sd_a)
    best = torch.full((M, M), -torch.inf)
    arg = torch.zeros(M, M, dtype=torch.long)
    for p in range(len(flips)):
        moved = sym.apply(TreeTransform(torch.arange(M), flips[p].expand(M, -1), order[p].expand(M, -1)), sd_b)
        score = flat_a @ _weighted(sym, moved).T
        better = score > best
        best = torch.where(better, score, best)
        arg[better] = p
    _, cols = linear_sum_assignment(best.numpy(), maximize=True)
    perm = torch.from_numpy(cols).long()
    chosen = arg[torch.arange(M), perm]
    return TreeTransform(perm, flips[chosen], order[chosen])


def plain(sym: TreeSymmetry, sd_a: dict, sd_b: dict) -> TreeTransform:
    flips, order = sym.shape.patterns(("perm", "flip", "order"))
    M = sym.trees
    one = TreeSymmetry(sym.shape, 1)
    omega2 = sym.shape.node_leaves.to(sd_a["split_weight"].dtype)
    best = torch.full((M, M), -torch.inf)
    arg = torch.zeros(M, M, dtype=torch.long)
    for j in range(M):
        tree = {k: v[j : j + 1] for k, v in sd_b.items()}
        for p in range(len(flips)):
            moved = one.apply(TreeTransform(torch.tensor([0]), flips[p : p + 1], order[p : p + 1]), tree)
            for i in range(M):
                nodes = (sd_a["split_weight"][i] * moved["split_weight"][0]).sum(1) \
                    + sd_a["split_bias"][i] * moved["split_bias"][0]
                value = float((omega2 * nodes).sum() + (sd_a["leaf_value"][i] * moved["leaf_value"][0]).sum())
                if value > best[i, j]:
                    best[i, j], arg[i, j] = value, p
    _, cols = linear_sum_assignment(best.numpy(), maximize=True)
    perm = torch.from_numpy(cols).long()
    chosen = arg[torch.arange(M), perm]
    return TreeTransform(perm, flips[chosen], order[chosen])


def _best_of(fn, repeat: int):
    seconds, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        seconds = min(seconds, time.perf_counter() - start)
    return seconds, out


def _total(sym: TreeSymmetry, sd_a: dict, sd_b: dict, element: TreeTransform) -> float:
    """The matched similarity Σ_i <A_i, aligned B_i> (weighted), in float64."""
    aligned = sym.apply(element, sd_b)
    return float((_weighted(sym, sd_a).double() * _weighted(sym, aligned).double()).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", type=int, default=256)
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--kinds", nargs="+", default=["perfect", "oblivious", "decision_list"], choices=TREE_KINDS)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--reference-trees", type=int, default=32, help="trees for the plain loops (0: skip)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"M = {args.trees} trees, {args.features} features, {args.classes} classes, {args.threads} thread(s); "
          f"plain loops at M = {args.reference_trees}")
    print(f"{'kind':<15}{'D':>2}{'patterns':>9}{'lmc s':>10}{'pattern loop s':>16}{'ratio':>8}"
          f"{'recursive s':>13}{'ratio':>8}{'lmc s (small)':>15}{'plain s (small)':>17}{'ratio':>9}")
    for kind in args.kinds:
        for depth in args.depths:
            sd_a = _ensemble(kind, depth, args.trees, args.features, args.classes, 0)
            sd_b = _ensemble(kind, depth, args.trees, args.features, args.classes, 1)
            sym = TreeSymmetry(SoftTreeEnsemble((args.features,), args.classes, trees=1, depth=depth,
                                                kind=kind).shape, args.trees)
            patterns = len(sym.shape.patterns(("perm", "flip", "order"))[0])
            t_lmc, found = _best_of(lambda: sym.weight_matching(sd_a, sd_b, search="enumerate"),  # noqa: B023
                                    args.repeat)
            t_loop, looped = _best_of(lambda: pattern_loop(sym, sd_a, sd_b), args.repeat)  # noqa: B023
            total = _total(sym, sd_a, sd_b, found)
            if abs(_total(sym, sd_a, sd_b, looped) - total) > 1e-4 * abs(total):
                raise SystemExit(f"{kind} D={depth}: the pattern loop reached a different total than lmc")
            recursive = f"{'-':>13}{'':>8}"
            if kind == "perfect":
                t_rec, rec = _best_of(lambda: sym.weight_matching(sd_a, sd_b, search="recursive"),  # noqa: B023
                                      args.repeat)
                if abs(_total(sym, sd_a, sd_b, rec) - total) > 1e-4 * abs(total):
                    raise SystemExit(f"{kind} D={depth}: the recursion reached a different total than the enumeration")
                recursive = f"{t_rec:>13.4g}{t_lmc / t_rec:>7.1f}x"
            small = ""
            if args.reference_trees:
                m = min(args.reference_trees, args.trees)
                sub_a, sub_b = ({k: v[:m] for k, v in sd.items()} for sd in (sd_a, sd_b))
                sym_small = TreeSymmetry(sym.shape, m)
                t_small, found_small = _best_of(  # noqa: B023
                    lambda: sym_small.weight_matching(sub_a, sub_b, search="enumerate"), args.repeat)  # noqa: B023
                t_plain, plained = _best_of(lambda: plain(sym_small, sub_a, sub_b), 1)  # noqa: B023
                small_total = _total(sym_small, sub_a, sub_b, found_small)
                if abs(_total(sym_small, sub_a, sub_b, plained) - small_total) > 1e-4 * abs(small_total):
                    raise SystemExit(f"{kind} D={depth}: the plain loops reached a different total than lmc")
                small = f"{t_small:>15.4g}{t_plain:>17.4g}{t_plain / t_small:>8.0f}x"
            print(f"{kind:<15}{depth:>2}{patterns:>9}{t_lmc:>10.4g}{t_loop:>16.4g}{t_loop / t_lmc:>7.1f}x{recursive}"
                  f"{small}", flush=True)


if __name__ == "__main__":
    main()
