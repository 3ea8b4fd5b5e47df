"""Weight-matching speed: lmc against the reference algorithm and the `rebasin` package (PyPI).

    python experiments/benchmarks/weight_matching.py [--quick] [--threads N] [--repeat N] [--only TEXT]
        [--cifar-steps N] [--cache DIR] [--run DIR ...]

Model pairs: MLP 3×512 trained briefly on MNIST-1D; VGG-16 and ResNet-20 ×1 / ×8 for CIFAR-10-shaped
inputs, each twice: at independent random initialisations, and trained ``--cifar-steps`` SGD steps
(default 100, batch 32) on a CIFAR-10-shaped task made up in :func:`_synthetic_batch` (CIFAR-10 itself
cannot be downloaded here, and training to convergence is beyond a CPU benchmark's budget; the trained
pairs are kept in ``--cache`` so that only the first run trains them, for about 5 minutes on 2 cores, mostly
ResNet-20 ×8). ``--run DIR`` takes instead the two trained endpoints of a finished
``python -m lmc.run``, e.g. ``experiment=resnet_cifar``. On each pair it times, in this one process and
on the same state dicts:

* ``lmc``: :func:`lmc.weight_matching` (spec derived once beforehand, not timed, like the stack layouts
  weight matching derives from it on its first use and keeps in ``spec.derived``);
* ``lmc 1st``: the same with those layouts derived again in every run, as in a spec's first call;
* ``reference``: :func:`reference_weight_matching` below, a plain re-implementation of
  samuela/git-re-basin's ``weight_matching`` (per group, permute every other axis of every entry of B,
  move the axis first, ``A @ B.T``, LAP, until no group improves) in float32 torch like the JAX original;
* ``rebasin``: ``rebasin.PermutationCoordinateDescent`` (0.0.47; its graph tracing is not timed), if it
  imports beside this torch and can take the model; otherwise the table says why.

Objectives are ``Σ <W_A, π(W_B)>`` over the parameters lmc's spec permutes, in float64, so the methods
are compared on the same number. ``ratio`` = method time / lmc time (> 1: lmc is faster). Under each pair,
the number of linear assignments lmc and the reference solve (one more, untimed run of each) and their time
per solve show how much of lmc's lead comes from skipping solves and how much from cheaper ones.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from lmc.core.models import build_model
from lmc.core.permutation import PermutationSpec, matching_objective, permutation_spec, weight_matching
from lmc.core.permutation.apply import permute_axis
from lmc.core.training import seeded_init


def reference_weight_matching(spec: PermutationSpec, params_a: dict, params_b: dict, max_iter: int = 100,
                              seed: int = 0) -> dict:
    """Git Re-Basin's weight matching written plainly (samuela/git-re-basin, weight_matching.py)."""
    perm = {g: torch.arange(n) for g, n in spec.sizes.items()}
    names = list(perm)
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        progress = False
        for gi in rng.permutation(len(names)):
            g = names[gi]
            n = spec.sizes[g]
            cost = torch.zeros(n, n)
            for ref in spec.perm_to_axes[g]:
                if ref.key not in params_a:
                    continue
                w_a, w_b = params_a[ref.key], params_b[ref.key]
                for axis, other in enumerate(spec.axes_to_perm[ref.key]):  # get_permuted_param(except_axis)
                    if other is not None and axis != ref.axis:
                        w_b = permute_axis(w_b, axis, perm[other], spec.block(ref.key, axis))
                w_a = w_a.movedim(ref.axis, 0).reshape(n, -1)
                w_b = w_b.movedim(ref.axis, 0).reshape(n, -1)
                cost += w_a @ w_b.T
            cost = cost.double().numpy()
            _, col = linear_sum_assignment(cost, maximize=True)
            old = cost[np.arange(n), perm[g].numpy()].sum()
            new = cost[np.arange(n), col].sum()
            progress = progress or new > old + 1e-12
            perm[g] = torch.from_numpy(col).long()
        if not progress:
            break
    return perm


def _mlp_pair(steps: int, data=None):
    """Two MLPs 3×512 (seeds 0 and 1) trained ``steps`` Adam steps on MNIST-1D (``data``, if already loaded)."""
    from lmc.core.data import load_dataset

    data = load_dataset("mnist1d") if data is None else data
    models = []
    for seed in (0, 1):
        model = seeded_init(lambda: build_model("mlp", (40,), 10, width=512, depth=3), seed)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(0, len(data.x_train), (128,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        models.append(model.eval())
    return models, torch.randn(2, 40)


def _random_pair(name, shape, **kw):
    models = [seeded_init(lambda: build_model(name, shape, 10, **kw), s).eval() for s in (0, 1)]
    return models, torch.randn(2, *shape)


CACHE = Path(__file__).resolve().parent / ".cache"  # trained pairs, kept between runs (not in git)
_RECIPE = "sgd0.05m0.9wd5e-4-bs32-protos8-noise1-shift4"  # in the cache file names: change it with the recipe


@functools.cache
def _prototypes() -> torch.Tensor:
    noise = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return torch.nn.functional.interpolate(noise, size=32, mode="bilinear", align_corners=False)


def _synthetic_batch(gen: torch.Generator, size: int = 32):
    """A batch of a CIFAR-10-shaped task made up here (nothing can be downloaded): 10 classes, each a
    smooth random 3×32×32 prototype (8×8 Gaussian noise upsampled), seen shifted by up to 4 pixels
    under unit Gaussian noise."""
    protos = _prototypes()
    y = torch.randint(0, 10, (size,), generator=gen)
    shifts = torch.randint(-4, 5, (size, 2), generator=gen).tolist()
    x = torch.stack([protos[c].roll(tuple(d), dims=(1, 2)) for c, d in zip(y.tolist(), shifts)])
    return x + torch.randn(x.shape, generator=gen), y


def _trained_pair(name, shape, steps: int, cache: Path | None, **kw):
    """Two models (seeds 0 and 1) trained ``steps`` SGD steps on :func:`_synthetic_batch`, on all CPU
    cores; kept in ``cache`` (if given) under a name that records the model, the steps and the recipe."""
    models, threads = [], torch.get_num_threads()
    for seed in (0, 1):
        model = seeded_init(lambda: build_model(name, shape, 10, **kw), seed)
        tag = "-".join([name, *(f"{k}{v}" for k, v in sorted(kw.items())), f"{steps}steps", _RECIPE, f"seed{seed}"])
        path = cache / f"{tag}.pt" if cache else None
        if path is not None and path.is_file():
            model.load_state_dict(torch.load(path, weights_only=True))
        else:
            torch.set_num_threads(os.cpu_count() or 1)
            try:
                opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
                gen = torch.Generator().manual_seed(seed)
                for _ in range(steps):
                    x, y = _synthetic_batch(gen)
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            finally:
                torch.set_num_threads(threads)
            if path is not None:  # written whole or not at all: an interrupted run leaves no broken file
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                torch.save(model.state_dict(), tmp)
                os.replace(tmp, path)
        models.append(model.eval())
    return models, torch.randn(2, *shape)


def _run_pair(run_dir: Path, data=None):
    """The trained endpoints of a finished run (its ``results.json`` config and ``checkpoints/``); ``data``:
    the run's dataset, if already loaded."""
    from lmc.core.data import from_options
    from lmc.io import load_verified
    from lmc.stages.settings import parse_model

    cfg = json.loads((run_dir / "results.json").read_text())["config"]
    data = from_options(cfg["data"]) if data is None else data
    architecture = parse_model(cfg["model"])
    models = []
    for name in ("model_a", "model_b"):
        model = architecture.build(data.input_shape, data.num_classes)
        model.load_state_dict(load_verified(run_dir / "checkpoints" / f"{name}.pt")["model"])
        models.append(model.eval())
    return models, data.x_train[:2]


def model_pairs(mlp_steps: int, cifar_steps: int = 100, cache: Path | None = None) -> dict:
    """The benchmark's model pairs: label -> function returning ``((model_a, model_b), example input)``.
    The CIFAR-shaped models come twice: at their random initialisations and trained ``cifar_steps`` steps
    on :func:`_synthetic_batch` (kept in ``cache``)."""
    cifar = {"VGG-16": dict(name="vgg", depth=16), "ResNet-20 x1": dict(name="resnet20", width=1),
             "ResNet-20 x8": dict(name="resnet20", width=8)}
    pairs = {f"MLP 3x512 ({mlp_steps} steps)": lambda: _mlp_pair(mlp_steps)}
    for label, kw in cifar.items():
        pairs[f"{label} (random)"] = lambda kw=kw: _random_pair(shape=(3, 32, 32), **kw)
        pairs[f"{label} ({cifar_steps} steps)"] = lambda kw=kw: _trained_pair(shape=(3, 32, 32), steps=cifar_steps,
                                                                              cache=cache, **kw)
    return pairs


def parse_with_pair_options(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """``parser``'s arguments, with the options choosing and making :func:`model_pairs` added and checked
    (``--mlp-steps``, ``--cifar-steps``, ``--cache``, ``--only``); shared by the benchmarks beside this file."""
    parser.add_argument("--mlp-steps", type=int, default=300, help="Adam steps training each MLP")
    parser.add_argument("--cifar-steps", type=int, default=100,
                        help="SGD steps training each CIFAR-shaped model of the trained pairs (default 100)")
    parser.add_argument("--cache", default=str(CACHE),
                        help=f"where trained pairs are kept between runs (default {CACHE}); '' to keep none")
    parser.add_argument("--only", metavar="TEXT", help="only the model pairs whose label contains TEXT (e.g. MLP)")
    args = parser.parse_args()
    if args.cifar_steps < 1:
        parser.error(f"--cifar-steps {args.cifar_steps}: must be a positive number of SGD steps")
    return args


def chosen_pairs(args: argparse.Namespace) -> dict:
    """:func:`model_pairs` as ``--mlp-steps``, ``--cifar-steps`` and ``--cache`` say (before ``--only``)."""
    return model_pairs(args.mlp_steps, args.cifar_steps, Path(args.cache) if args.cache else None)


def only(cases: dict, text: str | None, parser: argparse.ArgumentParser) -> dict:
    """The pairs whose label contains ``text`` (all if it is None); a parser error if there are none."""
    if text is None:
        return cases
    cases = {label: make for label, make in cases.items() if text.lower() in label.lower()}
    if not cases:
        parser.error(f"--only {text!r} matches no model pair")
    return cases


def _first_call(spec: PermutationSpec, pa: dict, pb: dict) -> dict:
    """:func:`weight_matching` as on a spec's first use: the layouts it keeps in ``spec.derived`` rebuilt."""
    spec.derived.clear()
    return weight_matching(spec, pa, pb)


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _objective(spec, perm, pa, pb):
    return matching_objective(spec, perm, pa, pb)


def _time(fns: dict, repeat: int, min_seconds: float = 1.0) -> dict:
    """``{name: (best time, output)}``: the functions run in alternation, each at least ``repeat`` times
    and for at least ``min_seconds`` in all (so that millisecond jobs are timed over hundreds of runs,
    not three, and a slow spell of the machine hits every method alike)."""
    best = {name: (float("inf"), None) for name in fns}
    runs, total = 0, dict.fromkeys(fns, 0.0)
    while runs < repeat or min(total.values()) < min_seconds:
        for name, fn in fns.items():
            start = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - start
            if seconds < best[name][0]:
                best[name] = (seconds, out)
            total[name] += seconds
        runs += 1
    return best


def _solves(fn, module) -> int:
    """How many linear assignments ``fn()`` solves through ``module.linear_sum_assignment``."""
    solve, count = module.linear_sum_assignment, [0]

    def counting(*args, **kwargs):
        count[0] += 1
        return solve(*args, **kwargs)

    with mock.patch.object(module, "linear_sum_assignment", counting):
        fn()
    return count[0]


def _rebasin(model_a, model_b, x, spec, pa, repeat: int, min_seconds: float = 1.0):
    """``rebasin``'s best time over at least ``repeat`` runs (or 1 s of runs), each on fresh copies with its
    graph tracing untimed, and the highest objective any run reached: its group order is random and
    unseeded, so time and objective vary from run to run; taking the best of each is in its favour."""
    try:
        from rebasin import PermutationCoordinateDescent
    except Exception as exc:  # noqa: BLE001 - report why it cannot run
        return None, None, f"import failed: {type(exc).__name__}: {exc}"[:120]
    ident = {g: torch.arange(n) for g, n in spec.sizes.items()}
    best, objective, runs, total = float("inf"), float("-inf"), 0, 0.0
    while runs < repeat or total < min_seconds:
        b = copy.deepcopy(model_b)
        try:
            pcd = PermutationCoordinateDescent(copy.deepcopy(model_a), b, x)
            start = time.perf_counter()
            pcd.calculate_permutations()
            seconds = time.perf_counter() - start
            pcd.apply_permutations()
        except Exception as exc:  # noqa: BLE001 - report why it cannot run
            return None, None, f"failed: {type(exc).__name__}: {exc}"[:120]
        best, runs, total = min(best, seconds), runs + 1, total + seconds
        objective = max(objective, _objective(spec, ident, pa, _params(b)))
    return best, objective, f"best time and best objective of {runs} runs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small models only (smoke test)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="best of at least this many timings per method (runs under 1 s are repeated for 1 s)")
    parser.add_argument("--run", type=Path, nargs="+", metavar="DIR",
                        help="instead: the trained endpoints of these finished runs (run directories)")
    args = parse_with_pair_options(parser)
    torch.set_num_threads(args.threads)

    if args.run:
        for run_dir in args.run:
            if not (run_dir / "results.json").is_file() or not (run_dir / "checkpoints").is_dir():
                parser.error(f"--run {run_dir}: not a finished run directory (needs results.json and checkpoints/)")
        cases = {f"run {d.name}"[:23]: (lambda d=d: _run_pair(d)) for d in args.run}
    elif args.quick:
        cases = {
            "MLP 3x64 (random)": lambda: _random_pair("mlp", (40,), width=64, depth=3),
            "ResNet-20 x1 (random)": lambda: _random_pair("resnet20", (3, 32, 32), width=1),
        }
    else:
        cases = chosen_pairs(args)
    cases = only(cases, args.only, parser)
    header = f"{'model':<26}{'method':<11}{'seconds':>9}{'ratio':>8}{'objective':>16}{'Δobj vs lmc':>14}  note"
    print(header)
    print("-" * len(header))
    for label, make in cases.items():
        (model_a, model_b), x = make()
        spec = permutation_spec(model_a, x)
        pa, pb = _params(model_a), _params(model_b)
        timed = _time({"lmc": lambda: weight_matching(spec, pa, pb),  # noqa: B023
                       "lmc 1st": lambda: _first_call(spec, pa, pb),  # noqa: B023
                       "reference": lambda: reference_weight_matching(spec, pa, pb)}, args.repeat)  # noqa: B023
        (t_lmc, perm), (t_first, perm_first), (t_ref, perm_ref) = timed["lmc"], timed["lmc 1st"], timed["reference"]
        obj_lmc = _objective(spec, perm, pa, pb)
        rows = [("lmc", t_lmc, obj_lmc, ""),
                ("lmc 1st", t_first, _objective(spec, perm_first, pa, pb), "stack layouts derived in the call"),
                ("reference", t_ref, _objective(spec, perm_ref, pa, pb), "")]
        t_rb, obj_rb, note = _rebasin(model_a, model_b, x, spec, pa, args.repeat)
        rows.append(("rebasin", t_rb, obj_rb, note))
        for method, seconds, obj, note in rows:
            if seconds is None:
                print(f"{label:<26}{method:<11}{'-':>9}{'-':>8}{'-':>16}{'-':>14}  {note}")
                continue
            print(f"{label:<26}{method:<11}{seconds:>9.4g}{seconds / t_lmc:>8.2f}{obj:>16.6g}"
                  f"{obj - obj_lmc:>+14.3g}  {note}")
        ident = {g: torch.arange(n) for g, n in spec.sizes.items()}
        # where the time goes: lmc skips the assignments whose cost matrix cannot have changed
        solves = {name: _solves(fn, module) for name, fn, module in (
            ("lmc", lambda: weight_matching(spec, pa, pb), importlib.import_module(weight_matching.__module__)),  # noqa: B023
            ("reference", lambda: reference_weight_matching(spec, pa, pb), sys.modules[__name__]))}  # noqa: B023
        print(f"{'':<26}(objective before matching: {_objective(spec, ident, pa, pb):.6g}; "
              f"{len(spec.groups)} groups)")
        print(f"{'':<26}(LAP solves: lmc {solves['lmc']}, reference {solves['reference']}; time per solve: "
              f"lmc {t_lmc / solves['lmc'] * 1e3:.3g} ms, reference {t_ref / solves['reference'] * 1e3:.3g} ms)")
        # the goal: lmc at least 2x faster than the fastest alternative at an equal or higher objective;
        # shown both among the alternatives reaching lmc's objective and among all of them
        tie = 1e-9 * abs(obj_lmc)
        ran = [r for r in rows[2:] if r[1] is not None]
        for among, pool in (("reaching lmc's objective", [r for r in ran if r[2] >= obj_lmc - tie]), ("any", ran)):
            if pool:
                method, seconds, obj, _ = min(pool, key=lambda r: r[1])
                verdict = "equal" if abs(obj_lmc - obj) <= tie else ("higher" if obj_lmc > obj else "LOWER")
                print(f"{'':<26}fastest alternative ({among}): {method}; lmc is {seconds / t_lmc:.2f}x faster "
                      f"({seconds / t_first:.2f}x on a first call), lmc's objective {verdict} ({obj_lmc - obj:+.3g})")
        print(flush=True)


if __name__ == "__main__":
    main()
