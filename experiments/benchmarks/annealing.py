"""Simulated annealing's speed (Entezari et al.): lmc's midpoint energy against a plain rebuild, same process.

    python experiments/benchmarks/annealing.py [--quick] [--steps N] [--threads N] [--batch-size N]
        [--num-batches N] [--train-steps N] [--repeat N] [--metric loss|error]

Pairs: two models (seeds 0 and 1) trained ``--train-steps`` Adam steps on MNIST-1D: one-hidden-layer MLPs of
width 64 and 512, an MLP 4×64, and a CNN (cnn1d, width 16, depth 3, BatchNorm). Each annealing run takes
``--steps`` steps on ``--num-batches`` fixed training batches of ``--batch-size`` (default one batch of 64, as
Entezari et al.'s ``barrier.py``), with an exponential schedule that starts accepting most moves and ends
rejecting most (``--t-start``, ``--t-end``, in units of the metric). Variants, timed in alternation (best of
``--repeat`` runs each):

* ``plain``: :func:`plain_annealing` below — the same algorithm (simanneal's rule, the same pre-drawn moves),
  but every proposal copies the permutation, rebuilds π(θ_B) with ``apply_permutation`` and the midpoint state
  dict, and evaluates it with ``functional_call`` (the rebuild-per-proposal evaluation of their code, without
  its numpy round trips and model construction, which would only slow it further);
* ``lmc-1``: :func:`lmc.core.permutation.annealing.anneal`, one proposal per forward pass (the midpoint kept
  in place, a swap rewriting only the units it touches, a plain forward call);
* ``lmc-16``: the same with up to 16 proposals per forward pass (vmap), batch size following the acceptance
  rate.

Columns: steps per second, the fraction of proposals accepted, ``ratio`` = variant steps/s ÷ plain steps/s
(> 1: faster), and whether the variant's accept/reject decisions and final permutation equal the plain
annealer's (``yes``/``no``).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from torch.nn import functional as F

from lmc.core.models import build_model
from lmc.core.permutation import apply_permutation, permutation_spec
from lmc.core.permutation.annealing import anneal, batch_metric, draw_moves, temperatures
from lmc.core.training import seeded_init

MODELS = {  # label: (zoo name, options)
    "mlp1x64": ("mlp", {"width": 64, "depth": 1}),
    "mlp1x512": ("mlp", {"width": 512, "depth": 1}),
    "mlp4x64": ("mlp", {"width": 64, "depth": 4}),
    "cnn3x16": ("cnn1d", {"width": 16, "depth": 3, "norm": "batchnorm"}),
}


def plain_annealing(spec, model, sd_a, sd_b, batches, steps, t_start, t_end, metric, seed):
    """The baseline: simanneal's loop with a full rebuild of the permuted B and the midpoint per proposal.
    Returns (best permutation, accepted flags)."""
    temps = temperatures(steps, t_start, t_end)
    moves, uniforms = draw_moves(spec, steps, seed)
    model.eval()
    ends = 0.5 * (batch_metric(model, sd_a, batches, metric) + batch_metric(model, sd_b, batches, metric))

    def energy_of(perm):
        permuted = apply_permutation(spec, perm, sd_b)
        mid = {k: (v + permuted[k]) * 0.5 if v.is_floating_point() else v for k, v in sd_a.items()}
        return batch_metric(model, mid, batches, metric) - ends

    perm = {g: torch.arange(n) for g, n in spec.sizes.items()}
    energy = energy_of(perm)
    best, best_perm, accepted = energy, perm, np.zeros(steps, dtype=bool)
    for step in range(steps):
        new = {g: p.clone() for g, p in perm.items()}
        for gi, g in enumerate(spec.groups):
            a, b = moves[step, gi]
            new[g][a], new[g][b] = perm[g][b], perm[g][a]
        proposed = energy_of(new)
        delta = proposed - energy
        if delta > 0 and math.exp(-delta / temps[step]) < uniforms[step]:
            continue
        accepted[step] = True
        perm, energy = new, proposed
        if energy < best:
            best, best_perm = energy, perm
    return best_perm, accepted


def _pair(name, options, data, train_steps):
    models = []
    for seed in (0, 1):
        model = seeded_init(lambda: build_model(name, data.input_shape, data.num_classes, **options), seed)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(train_steps):
            idx = torch.randint(0, len(data.x_train), (128,), generator=gen)
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        models.append(model.eval())
    return models


def _timed(fns: dict, repeat: int) -> dict:
    """``{name: (best seconds, output)}``, the functions run in alternation ``repeat`` times."""
    best = {name: (float("inf"), None) for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - start
            if seconds < best[name][0]:
                best[name] = (seconds, out)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000, help="annealing steps per run (default 2000)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per energy batch (default 64)")
    parser.add_argument("--num-batches", type=int, default=1, help="fixed energy batches (default 1)")
    parser.add_argument("--train-steps", type=int, default=300, help="Adam steps training each model of a pair")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per variant, best kept (default 3)")
    parser.add_argument("--metric", choices=("loss", "error"), default="loss", help="energy metric (default loss)")
    parser.add_argument("--t-start", type=float, default=0.05, help="start temperature (default 0.05)")
    parser.add_argument("--t-end", type=float, default=1e-4, help="end temperature (default 1e-4)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--quick", action="store_true",
                        help="100 steps, 20 training steps, 1 repeat, two models (smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.train_steps, args.repeat = 100, 20, 1
        args.models = ["mlp1x64", "cnn3x16"]
    torch.set_num_threads(args.threads)
    from lmc.core.data import load_dataset

    data = load_dataset("mnist1d")
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data.x_train), generator=gen)
    batches = [(data.x_train[idx], data.y_train[idx])
               for idx in order[: args.batch_size * args.num_batches].split(args.batch_size)]
    print(f"{args.steps} steps, {args.num_batches} batch(es) of {args.batch_size}, metric {args.metric}, "
          f"T {args.t_start} → {args.t_end}, {args.threads} thread(s), best of {args.repeat}")
    print(f"{'model':<12}{'variant':<10}{'steps/s':>10}{'accepted':>10}{'ratio':>8}{'same':>6}")
    for label in args.models:
        name, options = MODELS[label]
        model_a, model_b = _pair(name, options, data, args.train_steps)
        spec = permutation_spec(model_a, data.x_train[:2])
        sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
        common = dict(steps=args.steps, t_start=args.t_start, t_end=args.t_end, metric=args.metric, seed=0)
        timed = _timed({
            "plain": lambda: plain_annealing(spec, model_a, sd_a, sd_b, batches, **common),  # noqa: B023
            "lmc-1": lambda: anneal(spec, model_a, sd_a, sd_b, batches, proposals=1, **common),  # noqa: B023
            "lmc-16": lambda: anneal(spec, model_a, sd_a, sd_b, batches, proposals=16, **common),  # noqa: B023
        }, args.repeat)
        plain_seconds, (plain_perm, plain_accepted) = timed["plain"]
        for variant, (seconds, out) in timed.items():
            perm, accepted = (out.permutation, out.accepted) if variant != "plain" else out
            same = np.array_equal(accepted, plain_accepted) and all(torch.equal(perm[g], plain_perm[g])
                                                                     for g in spec.groups)
            print(f"{label:<12}{variant:<10}{args.steps / seconds:>10.0f}{accepted.mean():>10.2f}"
                  f"{plain_seconds / seconds:>8.2f}{'yes' if same else 'no':>6}")


if __name__ == "__main__":
    main()
