"""Evaluation throughput of interpolation sweeps against a raw forward pass, in the same process.

    python experiments/benchmarks/interpolation.py                      # CPU: MLP (MNIST-1D shapes), ResNet-20 ×1
    python experiments/benchmarks/interpolation.py --device cuda --examples 10000 --sets 40
    python experiments/benchmarks/interpolation.py --quick              # seconds: a smoke test

For each model, two networks (seeded inits; throughput does not depend on training) and one set of
random examples of the model's input shape (MNIST-1D: 40 features; ResNet-20 ×1: CIFAR's 3×32×32), all
on ``--device``. Four ways of evaluating, timed interleaved and repeated (best of ``--repeat``):

* ``raw forward``: ``model(x)`` over the examples in batches of ``--batch-size`` under inference mode,
  nothing else, as many passes as the layer-wise sweeps evaluate networks: the baseline;
* ``whole sweep``: :func:`lmc.core.interpolation.sweep` over ``--alphas`` α (interpolate, swap the
  parameters in, forward, loss and accuracy);
* ``layer-wise seq``: :func:`lmc.core.layerwise.layerwise_rows` over the first ``--sets`` single layers,
  both bases, α ∈ {0, ½, 1}, one network after the other (``batched=False``);
* ``layer-wise batched``: the same, up to ``MAX_STACK`` networks per vmapped call (``batched=True``).

Throughput is network-examples per second (evaluations × examples / seconds), the ratio is against the
raw forward pass's. The last line per model gives batched / sequential and what ``batched="auto"``
chooses on this machine (:func:`lmc.core.layerwise.batched_pays`).
"""

from __future__ import annotations

import argparse
import time

import torch

from lmc.core.interpolation import alpha_grid, sweep
from lmc.core.layerwise import MAX_STACK, batched_pays, layer_groups, layerwise_points, layerwise_rows, single_sets
from lmc.core.models import build_model
from lmc.core.training import seeded_init

SHAPES = {"mlp": ((40,), {"width": 512, "depth": 3}), "resnet20": ((3, 32, 32), {"width": 1})}
QUICK = {"mlp": ((40,), {"width": 64, "depth": 2}), "resnet20": ((3, 16, 16), {"width": 1, "base_channels": 4})}
EXAMPLES = {"cpu": {"mlp": 5000, "resnet20": 256}, "cuda": {"mlp": 5000, "resnet20": 10000}}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--examples", type=int, help="examples per evaluation (default: 5000 MLP; ResNet-20 256 "
                                                     "on the CPU, 10000 elsewhere)")
    parser.add_argument("--batch-size", type=int, default=8192, help="examples per forward (as interp.eval_batch_size)")
    parser.add_argument("--alphas", type=int, default=5, help="α of the whole-model sweep")
    parser.add_argument("--sets", type=int, default=4, help="single layers in the layer-wise sweeps")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many interleaved timings")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="small models and data, 2 layers, 3 α, one repeat "
                                                             "(a smoke test)")
    args = parser.parse_args()
    for name in ("examples", "batch_size", "alphas", "sets", "repeat", "threads"):
        value = getattr(args, name)
        if value is not None and value < (2 if name == "alphas" else 1):
            parser.error(f"--{name.replace('_', '-')} {value}: must be at least {2 if name == 'alphas' else 1}")
    if args.quick:
        args.sets, args.alphas, args.repeat = 2, 3, 1
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"{'model':<10}{'path':<22}{'evals':>6}{'net-ex/s':>12}{'vs raw':>9}")
    for model_name in args.models:
        cpu = device.type == "cpu"
        examples = args.examples or (64 if args.quick else EXAMPLES["cpu" if cpu else "cuda"][model_name])
        bench(model_name, *(QUICK if args.quick else SHAPES)[model_name], examples, device, args)


def bench(model_name: str, input_shape: tuple[int, ...], options: dict, examples: int, device: torch.device,
          args: argparse.Namespace) -> None:
    build = lambda: build_model(model_name, input_shape, 10, **options).to(device)
    model, sd_a, sd_b = build(), seeded_init(build, 0).state_dict(), seeded_init(build, 1).state_dict()
    model.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(examples, *input_shape, generator=g).to(device)
    y = torch.randint(0, 10, (examples,), generator=g).to(device)
    splits = {"eval": (x, y)}
    sets = single_sets(layer_groups(model))[: args.sets]
    layerwise_evals = len(layerwise_points(model, sd_a, sd_b, sets, "naive"))

    @torch.inference_mode()
    def raw():  # as many passes as the layer-wise sweeps make: the same exposure to a busy machine
        for _ in range(layerwise_evals):
            for i in range(0, examples, args.batch_size):
                model(x[i : i + args.batch_size])

    def layerwise(batched: bool):
        return lambda: layerwise_rows(model, sd_a, sd_b, splits, sets, "naive", batch_size=args.batch_size,
                                      batched=batched)

    paths = {
        "raw forward": (layerwise_evals, raw),
        "whole sweep": (args.alphas, lambda: sweep(model, sd_a, sd_b, alpha_grid(args.alphas), splits, "naive",
                                                   batch_size=args.batch_size)),
        "layer-wise seq": (layerwise_evals, layerwise(False)),
        "layer-wise batched": (layerwise_evals, layerwise(True)),
    }
    for _, run in paths.values():  # warm-up: allocator, kernels, vmap's caches
        run()
    best = {name: float("inf") for name in paths}
    for _ in range(args.repeat):
        for name, (_, run) in paths.items():
            sync(device)
            start = time.perf_counter()
            run()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    throughput = {name: evals * examples / best[name] for name, (evals, _) in paths.items()}
    for name, (evals, _) in paths.items():
        print(f"{model_name:<10}{name:<22}{evals:>6}{throughput[name]:>12.4g}"
              f"{throughput[name] / throughput['raw forward']:>8.2f}x")
    states = [p.build() for p in layerwise_points(model, sd_a, sd_b, sets, "naive")[:MAX_STACK]]
    auto = "batched" if batched_pays(model, states, x, y, args.batch_size) else "sequential"
    print(f"{model_name:<10}batched / sequential: {best['layer-wise seq'] / best['layer-wise batched']:.2f}x "
          f"(auto picks {auto}; {examples} examples, {len(sets)} layers, {args.threads} thread(s), {device})")
    print(flush=True)


if __name__ == "__main__":
    main()
