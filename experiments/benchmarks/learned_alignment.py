"""Learned alignments' speed: Sinkhorn re-basin and the straight-through estimator, against baselines.

    python experiments/benchmarks/learned_alignment.py [--methods sinkhorn ste] [--threads N] [--steps N]
        [--mlp-steps N] [--run DIR] [--normalize-only] [--quick]

**Sinkhorn re-basin** (Peña et al. 2023) spends most of its time turning each group's logits into a
doubly-stochastic matrix: ``iters`` alternating row and column normalisations in the log domain, forward
and backward, every optimisation step. lmc's :func:`lmc.core.permutation.soft.sinkhorn_normalize` writes each
half-step as a ``log_softmax`` (the last with the ``exp`` as a ``softmax``); :func:`plain_sinkhorn` below
writes it as ``log_p − logsumexp(log_p)``, as one would from the formula. The values are the same up to
rounding.

**The straight-through estimator** (Git Re-Basin) projects its free weights onto B's permutations by
weight matching at every step, starting from the previous step's permutation. lmc also carries each
group's LAP column prices from one step's weight matching to the next (``warm_start``); the baseline
(``cold``) starts every weight matching without them. The permutations are the same.

Both run in this process, on the same inputs:

1. Sinkhorn's normalisation alone, forward and backward, in alternation, on three 512×512 logit matrices
   (the MLP 3×512's groups) whose entries spread over ``σ`` = 1 (near-uniform soft permutations, early in
   an alignment) to 1000 (sharp ones: learned logits over a small temperature, late in an alignment);
2. each whole alignment, :func:`lmc.sinkhorn` and :func:`lmc.ste` with the settings of
   ``conf/align/{sinkhorn,ste}.yaml`` (1000 steps, batch 256, seed 0: the batches ``align=`` draws), on an
   MLP 3×512 pair trained ``--mlp-steps`` Adam steps on MNIST-1D, or on the endpoints of a finished
   ``python -m lmc.run`` (``--run DIR``); once as lmc runs it and once with the baseline in its place. It
   prints seconds per step, the ratio, the midpoint training loss each permutation reaches, and how many
   units the two permutations share (Sinkhorn's optimisation is chaotic, so rounding differences can end
   in a different, equally good permutation).

``ratio`` = baseline time / lmc time (> 1: lmc is faster).
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path
from unittest import mock

import torch
from weight_matching import _mlp_pair, _run_pair, _time

from lmc.core.alignment import train_batches
from lmc.core.permutation import apply_permutation, permutation_spec, sinkhorn_rebasin, ste, weight_matching
from lmc.core.permutation.soft import sinkhorn_normalize
from lmc.core.training import evaluate

LEARNED = importlib.import_module("lmc.core.permutation.learned")


def plain_sinkhorn(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """The baseline: Sinkhorn in the log domain written from the formula, with ``logsumexp``."""
    log_p = logits
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True)
    return log_p.exp()


def _normalize_case(fn, logits: list[torch.Tensor], weights: list[torch.Tensor]):
    """Forward and backward of ``Σ <fn(logits), weights>``: (the matrices, the logits' gradients)."""
    leaves = [x.clone().requires_grad_(True) for x in logits]
    mats = [fn(x, 20) for x in leaves]
    sum((m * w).sum() for m, w in zip(mats, weights)).backward()
    return [m.detach() for m in mats], [x.grad for x in leaves]


def normalisation_table(min_seconds: float) -> None:
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(512, 512, generator=gen) for _ in range(3)]
    weights = [torch.randn(512, 512, generator=gen) for _ in range(3)]
    print(f"{'logit spread σ':<16}{'lmc ms':>9}{'plain ms':>10}{'ratio':>8}{'max |ΔP|':>11}{'max rel. Δgrad':>16}")
    for sigma in (1, 10, 100, 1000):
        logits = [sigma * x for x in base]
        timed = _time({"lmc": lambda: _normalize_case(sinkhorn_normalize, logits, weights),  # noqa: B023
                       "plain": lambda: _normalize_case(plain_sinkhorn, logits, weights)},  # noqa: B023
                      3, min_seconds)
        (t_lmc, (p_lmc, g_lmc)), (t_plain, (p_plain, g_plain)) = timed["lmc"], timed["plain"]
        dp = max(float((a - b).abs().max()) for a, b in zip(p_lmc, p_plain))
        dg = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(g_lmc, g_plain))
        print(f"{sigma:<16}{t_lmc * 1e3:>9.2f}{t_plain * 1e3:>10.2f}{t_plain / t_lmc:>8.2f}{dp:>11.1e}{dg:>16.1e}")


def _cold_weight_matching(*args, warm_start=None, **kwargs):
    """The STE baseline's projection: weight matching without the prices carried between steps."""
    return weight_matching(*args, **kwargs)


def _swapped(name: str, replacement):
    """A function running ``fn`` with ``lmc.core.permutation.learned.<name>`` replaced by ``replacement``."""
    def run(fn):
        with mock.patch.object(LEARNED, name, replacement):
            return fn()
    return run


def alignment_tables(args: argparse.Namespace) -> None:
    from lmc.core.data import from_options, load_dataset

    if args.run:
        import json

        data = from_options(json.loads((args.run / "results.json").read_text())["config"]["data"])
        (model_a, model_b), _ = _run_pair(args.run, data)
        label = f"run {args.run.name}"
    else:
        data = load_dataset("mnist1d")
        (model_a, model_b), _ = _mlp_pair(args.mlp_steps, data)
        label = f"MLP 3x512 ({args.mlp_steps} steps)"
    spec = permutation_spec(model_a, data.x_train[:2])
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    cases = {
        "sinkhorn": ("lmc.sinkhorn (midpoint objective, τ 1 → 0.05)", "plain",
                     lambda: sinkhorn_rebasin(spec, model_a, sd_a, sd_b, train_batches(data, 256, 0), steps=args.steps),
                     _swapped("sinkhorn_normalize", plain_sinkhorn)),
        "ste": ("lmc.ste (lr 1e-3)", "cold",
                lambda: ste(spec, model_a, sd_a, sd_b, train_batches(data, 256, 0), steps=args.steps),
                _swapped("weight_matching", _cold_weight_matching)),
    }
    for method in args.methods:
        title, baseline, align, swap = cases[method]
        found, seconds = {}, {}
        for name, run in (("lmc", lambda fn: fn()), (baseline, swap)):
            start = time.perf_counter()
            found[name] = run(align)
            seconds[name] = time.perf_counter() - start
        print(f"\n{label}: {title}, {args.steps} steps, batch 256")
        print(f"{'variant':<16}{'ms/step':>9}{'ratio':>8}{'midpoint train loss':>21}")
        for name in ("lmc", baseline):
            aligned = apply_permutation(spec, found[name], sd_b)
            mid = {k: 0.5 * (v + aligned[k]) if v.is_floating_point() else v for k, v in sd_a.items()}
            loss, _ = evaluate(model_a, data.x_train, data.y_train, params=mid)
            print(f"{name:<16}{seconds[name] / args.steps * 1e3:>9.1f}{seconds[baseline] / seconds[name]:>8.2f}"
                  f"{loss:>21.4f}")
        same = sum(int((found["lmc"][g] == found[baseline][g]).sum()) for g in spec.groups)
        print(f"units the two permutations assign alike: {same} of {sum(spec.sizes.values())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=("sinkhorn", "ste"), default=["sinkhorn", "ste"],
                        help="the whole alignments to time (default both)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--steps", type=int, default=1000, help="optimisation steps (default 1000, as configured)")
    parser.add_argument("--mlp-steps", type=int, default=300, help="Adam steps training each MLP of the pair")
    parser.add_argument("--run", type=Path, metavar="DIR", help="instead: the trained endpoints of this finished run")
    parser.add_argument("--normalize-only", action="store_true", help="only the normalisation table")
    parser.add_argument("--quick", action="store_true",
                        help="time the normalisations 3 times each instead of for at least 1 s (smoke test)")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: must be a positive number of optimisation steps")
    if args.run and not ((args.run / "results.json").is_file() and (args.run / "checkpoints").is_dir()):
        parser.error(f"--run {args.run}: not a finished run directory (needs results.json and checkpoints/)")
    torch.set_num_threads(args.threads)
    normalisation_table(0.0 if args.quick else 1.0)
    if not args.normalize_only:
        alignment_tables(args)


if __name__ == "__main__":
    main()
