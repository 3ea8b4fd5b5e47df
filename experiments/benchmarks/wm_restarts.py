"""Weight matching's local optima: what each way of starting or restarting the descent reaches, at what cost.

    python experiments/benchmarks/wm_restarts.py [--seeds N] [--only TEXT] [--strategies A,B,...] [--threads N]
        [--mlp-steps N] [--cifar-steps N] [--cache DIR]

Weight matching is a coordinate descent (one group at a time, in an order drawn from ``align.seed``), and the
local optimum it stops in depends on that order and on where it starts. Cases:

* ``MLP 3x512 MNIST-1D``: the default run's pair, MLPs 3×512 trained as ``conf/train/mnist1d_mlp.yaml`` says
  (``TrainConfig(epochs=30, batch_size=128, lr=1e-3, optimizer="adam", schedule="cosine")``, init and
  data-order seeds 0 and 1; kept in ``--cache``, together with their state after 10 of the 30 epochs):
  objective and test-loss barrier (25 α), next to the naive (unaligned) barrier;
* ``MobileNetV2 copy``: torchvision's mobilenet_v2 at random initialisation and a randomly permuted copy:
  the objective reached against the true inverse's;
* the pairs of ``weight_matching.py`` beside this file (``--only`` picks among all cases by label).

Strategies (``--strategies``), each run for align seeds 0..N−1:

* ``identity``: Git Re-Basin's weight matching (the start is the identity);
* ``identity x5``: the best objective of 5 runs (``restarts=5``: the group orders of ``restart_seeds``);
* ``sequential``: ``init="sequential"`` (each group placed once, from the terms through fixed axes and groups
  already placed, before the descent);
* ``sequential x3``: the best of 3 runs from the sequential start;
* ``activation``: the descent started from activation matching's permutation (correlation, 8 training batches
  of 500; random inputs for the MobileNet copy); its time includes activation matching's;
* ``previous``: the descent started from the permutation found (sequentially) for the same pair after 10 of
  its 30 epochs, as when aligning checkpoints along training (MLP only; its time excludes that earlier match).

For each case and strategy: every seed's objective (and barrier), their mean ± std and range, the mean time
per seed and its ratio to ``identity`` (measured under whatever load the machine has).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from weight_matching import _params, chosen_pairs, only, parse_with_pair_options

from lmc.core.barriers import barrier
from lmc.core.interpolation import alpha_grid, sweep
from lmc.core.models import build_model
from lmc.core.permutation import (
    activation_matching,
    apply_permutation,
    invert_permutation,
    matching_objective,
    permutation_spec,
    random_permutation,
    weight_matching,
    weight_matching_restarts,
)
from lmc.core.training import TrainConfig, seeded_init, train

STRATEGIES = ("identity", "identity x5", "sequential", "sequential x3", "activation", "previous")
MLP_TRAIN = TrainConfig(epochs=30, batch_size=128, lr=1e-3, optimizer="adam", schedule="cosine")
EARLY_EPOCHS = 10  # the "previous" strategy's earlier checkpoint


def _atomic_save(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def mlp_default_pair(cache: Path | None, data):
    """The default run's two MLPs (final, and after ``EARLY_EPOCHS`` epochs of the same trajectory)."""
    final, early = [], []
    steps_per_epoch = -(-len(data.x_train) // MLP_TRAIN.batch_size)
    for seed in (0, 1):
        def make(seed=seed):
            return seeded_init(lambda: build_model("mlp", data.input_shape, data.num_classes, width=512, depth=3),
                               seed)
        for stop, out in ((None, final), (EARLY_EPOCHS * steps_per_epoch, early)):
            model = make()
            tag = f"mlp3x512-mnist1d-{MLP_TRAIN.epochs}ep-adam1e-3-cosine-bs128-seed{seed}" + (
                f"-step{stop}" if stop else "")
            path = cache / f"{tag}.pt" if cache else None
            if path is not None and path.is_file():
                model.load_state_dict(torch.load(path, weights_only=True))
            else:
                train(model, data, MLP_TRAIN, data_seed=seed, progress=False, stop_step=stop)
                if path is not None:
                    _atomic_save(model.state_dict(), path)
            out.append(model.eval())
    return final, early


def _mobilenet_copy():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    spec = permutation_spec(model, x)
    other = copy.deepcopy(model)
    perm = random_permutation(spec, 1)
    other.load_state_dict(apply_permutation(spec, perm, model.state_dict()))
    return (model, other), spec, invert_permutation(perm)


def run_strategy(strategy, spec, pa, pb, seed, start=None):
    """(permutation, seconds) of one strategy for one align seed; ``start``: a starting permutation (activation
    or previous) and the seconds it cost to make, if that counts."""
    begin = time.perf_counter()
    if strategy in ("activation", "previous"):
        perm = weight_matching(spec, pa, pb, seed=seed, init_perm=start[0])
        return perm, time.perf_counter() - begin + start[1]
    init, _, times = strategy.partition(" x")
    if times:
        perm = weight_matching_restarts(spec, pa, pb, restarts=int(times), seed=seed, init=init).perm
    else:
        perm = weight_matching(spec, pa, pb, seed=seed, init=init)
    return perm, time.perf_counter() - begin


def summary(values):
    mean = statistics.fmean(values)
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{mean:.6g} ± {std:.3g} ({min(values):.6g}–{max(values):.6g})"


def report(label, strategies, spec, pa, pb, seeds, barrier_of=None, starts=None, reference=None):
    print(f"== {label}: {len(spec.groups)} groups" + (f"; {reference}" if reference else ""), flush=True)
    base = None
    for strategy in strategies:
        if strategy in ("activation", "previous") and (starts is None or strategy not in starts):
            continue
        objectives, barriers, seconds = [], [], []
        for seed in range(seeds):
            perm, took = run_strategy(strategy, spec, pa, pb, seed, starts.get(strategy) if starts else None)
            objectives.append(matching_objective(spec, perm, pa, pb))
            seconds.append(took)
            if barrier_of is not None:
                barriers.append(barrier_of(perm))
        mean_s = statistics.fmean(seconds)
        base = mean_s if strategy == "identity" else base
        cost = f"{mean_s / base:.2f}x identity" if base else ""
        print(f"  {strategy:<14} objective {summary(objectives)}; {mean_s:.3g} s per seed {cost}")
        print(f"  {'':<14}   per seed: " + " ".join(f"{o:.6g}" for o in objectives))
        if barriers:
            print(f"  {'':<14}   test-loss barrier {summary(barriers)}; per seed: "
                  + " ".join(f"{b:.3f}" for b in barriers))
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10, help="align seeds 0..N-1 per strategy (default 10)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help=f"comma-separated, among: {', '.join(STRATEGIES)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parse_with_pair_options(parser)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or args.seeds < 1:
        parser.error(f"--strategies {bad}: valid are {', '.join(STRATEGIES)}" if bad else "--seeds must be >= 1")
    torch.set_num_threads(args.threads)
    cache = Path(args.cache) if args.cache else None

    cases = {"MLP 3x512 MNIST-1D (default run)": "mlp", "MobileNetV2 permuted copy": "mobilenet",
             **chosen_pairs(args)}
    for label, make in only(cases, args.only, parser).items():
        if make == "mlp":
            from lmc.core.data import load_dataset

            data = load_dataset("mnist1d", download=True)
            (a, b), (a_early, b_early) = mlp_default_pair(cache, data)
            spec = permutation_spec(a, data.x_train[:2])
            pa, pb = _params(a), _params(b)
            alphas = alpha_grid(25)

            def barrier_of(perm, a=a, b=b, spec=spec, data=data, alphas=alphas):
                sd_b = b.state_dict() if perm is None else apply_permutation(spec, perm, b.state_dict())
                rows = sweep(a, a.state_dict(), sd_b, alphas, {"test": (data.x_test, data.y_test)}, "wm")
                return barrier(alphas, [r["loss"] for r in rows])

            gen = torch.Generator().manual_seed(0)
            batches = [data.x_train[torch.randint(0, len(data.x_train), (500,), generator=gen)] for _ in range(8)]
            begin = time.perf_counter()
            am = activation_matching(spec, a, b, batches)
            starts = {"activation": (am, time.perf_counter() - begin),
                      "previous": (weight_matching(spec, _params(a_early), _params(b_early), init="sequential"), 0.0)}
            report(label, strategies, spec, pa, pb, args.seeds, barrier_of, starts,
                   reference=f"naive barrier {barrier_of(None):.3f}; activation matching alone: objective "
                             f"{matching_objective(spec, am, pa, pb):.6g}, barrier {barrier_of(am):.3f}")
        elif make == "mobilenet":
            (a, b), spec, truth = _mobilenet_copy()
            pa, pb = _params(a), _params(b)
            begin = time.perf_counter()
            x = torch.randn(64, 3, 64, 64, generator=torch.Generator().manual_seed(1))
            am = activation_matching(spec, a, b, [x[:32], x[32:]])
            report(label, strategies, spec, pa, pb, args.seeds,
                   starts={"activation": (am, time.perf_counter() - begin)},
                   reference=f"true inverse's objective {matching_objective(spec, truth, pa, pb):.6g}")
        else:
            (a, b), x = make()
            spec = permutation_spec(a, x)
            report(label, strategies, spec, _params(a), _params(b), args.seeds)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
