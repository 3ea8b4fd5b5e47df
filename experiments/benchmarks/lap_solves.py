"""LAP solver seconds inside weight matching: what the row/column reduction and the carried prices buy.

    python experiments/benchmarks/lap_solves.py [--only TEXT] [--repeat N] [--mlp-steps N] [--cifar-steps N]
        [--cache DIR]

For each model pair of the weight-matching benchmark (``weight_matching.py`` beside this file), runs
:func:`lmc.weight_matching` once with every group carrying column prices, records each cost matrix it
hands to the LAP solver together with the prices carried into that solve, and then times
:func:`scipy.optimize.linear_sum_assignment` on that same sequence of matrices, in this process, four
ways:

* ``plain``: the cost as it is (``maximize=True``), the baseline;
* ``prices``: the cost minus the carried prices;
* ``reduced``: the cost reduced by its row minima, then by its column minima;
* ``prices+reduced``: both.

All four have the same optimum (a constant per row or per column changes every assignment's total
equally); the script checks that each reaches the same total as ``plain`` on every matrix. The matrices
are solved one after another, as in a run, not each many times over: repeating one matrix lets the
CPU learn its branches and understates the solver's time. ``lmc`` solves groups of at least
``_WARM`` units with prices and all groups reduced.
"""

from __future__ import annotations

import argparse
import importlib
import time
from unittest import mock

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from weight_matching import _params, chosen_pairs, only, parse_with_pair_options

from lmc.core.permutation import permutation_spec, weight_matching

WM = importlib.import_module("lmc.core.permutation.weight_matching")


def _record(spec, pa, pb) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Every (cost, carried prices) lmc's weight matching solves, with prices carried by every group."""
    solves, assign = [], WM._assign

    def recording(cost, prices=None, relax=False):
        solves.append((cost.copy(), None if prices is None else prices.copy()))
        return assign(cost, prices, relax)

    with mock.patch.multiple(WM, _assign=recording, _WARM=0):
        weight_matching(spec, pa, pb)
    return solves


def _reduce(k: np.ndarray) -> np.ndarray:
    k = k - k.min(1, keepdims=True)
    return k - k.min(0)


VARIANTS = {
    "plain": lambda c, p: linear_sum_assignment(c, maximize=True)[1],
    "prices": lambda c, p: linear_sum_assignment(-c if p is None else -c - p)[1],
    "reduced": lambda c, p: linear_sum_assignment(_reduce(-c))[1],
    "prices+reduced": lambda c, p: linear_sum_assignment(_reduce(-c if p is None else -c - p))[1],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="best of this many passes over the matrices")
    args = parse_with_pair_options(parser)
    torch.set_num_threads(1)
    cases = only(chosen_pairs(args), args.only, parser)
    print(f"{'model':<26}{'variant':<16}{'solver s':>10}{'vs plain':>10}  solves, sizes")
    for label, make in cases.items():
        (model_a, model_b), x = make()
        spec = permutation_spec(model_a, x)
        solves = _record(spec, _params(model_a), _params(model_b))
        sizes = sorted({len(c) for c, _ in solves})
        best = {}
        for name, solve in VARIANTS.items():
            seconds = float("inf")
            for _ in range(args.repeat):
                start = time.perf_counter()
                cols = [solve(c, p) for c, p in solves]
                seconds = min(seconds, time.perf_counter() - start)
            best[name] = seconds
            if name == "plain":
                totals = [c[np.arange(len(c)), col].sum() for (c, _), col in zip(solves, cols)]
            else:
                for (c, _), col, total in zip(solves, cols, totals):
                    if not np.isclose(c[np.arange(len(c)), col].sum(), total, rtol=1e-12, atol=0):
                        raise SystemExit(f"{label}: {name} reached a different optimum than plain")
        for name, seconds in best.items():
            print(f"{label:<26}{name:<16}{seconds:>10.4g}{best['plain'] / seconds:>9.2f}x  "
                  f"{len(solves)}, {sizes}")
        print(flush=True)


if __name__ == "__main__":
    main()
