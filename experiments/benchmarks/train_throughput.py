"""Training throughput of lmc's trainer against a minimal hand-written loop, in the same process.

    python experiments/benchmarks/train_throughput.py                       # CPU: ResNet-20 ×1 and MLP/MNIST-1D
    python experiments/benchmarks/train_throughput.py --device cuda --widths 1 4 --pair

Both loops train the same model (same init) with the same batch size and optimiser on the same data held
on the device; the minimal loop is randperm → index → forward → cross-entropy → backward → step, nothing
else (on CUDA it uses the same bf16 autocast and channels-last layout as lmc's GPU recipe). Timings are
interleaved and repeated; the best of the repeats is reported. ``--pair`` (for GPUs) also times a seed
pair: lmc's ``train_pair`` sequential and with ``concurrent_pair`` (two threads, one CUDA stream each)
against two sequential minimal loops, and, on CUDA, the two minimal loops interleaved step by step on two
streams from one thread.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import time
from dataclasses import replace

import torch
from torch.nn import functional as F

from lmc.core.data import Dataset, load_dataset
from lmc.core.models import build_model
from lmc.core.training import TrainConfig, seeded_init, train, train_pair


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_images(n: int, device: torch.device) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return Dataset("random-cifar", x, y, x[:256], y[:256], 10).to(device)


def optimizer(model, cfg: TrainConfig):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def minimal_steps(model, data: Dataset, cfg: TrainConfig, seed: int):
    """A generator doing one optimiser step per ``next()``: the hand-written baseline loop."""
    x, y = data.x_train, data.y_train
    cuda = x.device.type == "cuda"
    fmt = torch.channels_last if cfg.channels_last and cuda else torch.contiguous_format
    model.to(memory_format=fmt).train()
    opt = optimizer(model, cfg)
    order_gen = torch.Generator().manual_seed(seed)
    for _epoch, i in itertools.product(range(cfg.epochs), range(0, len(y), cfg.batch_size)):
        if i == 0:
            order = torch.randperm(len(y), generator=order_gen).to(x.device)
        idx = order[i : i + cfg.batch_size]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and cuda):
            loss = F.cross_entropy(model(x[idx].contiguous(memory_format=fmt)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        yield


def time_it(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def compare(label: str, build, data: Dataset, cfg: TrainConfig, repeats: int, pair: bool) -> None:
    device = data.x_train.device
    n = len(data.y_train) * cfg.epochs

    def lmc(seeds=(0,)):
        for s in seeds:
            train(seeded_init(build, s).to(device), data, cfg, data_seed=s, progress=False)

    def lmc_pair(concurrent):
        models = [seeded_init(build, s).to(device) for s in (0, 1)]
        train_pair(models, [data, data], replace(cfg, concurrent_pair=concurrent), [0, 1], progress=False)

    def minimal(seeds=(0,)):
        for s in seeds:
            for _ in minimal_steps(seeded_init(build, s).to(device), data, cfg, s):
                pass

    def minimal_streams(seeds=(0, 1)):
        streams = [torch.cuda.Stream(device) for _ in seeds]
        loops = [minimal_steps(seeded_init(build, s).to(device), data, cfg, s) for s in seeds]
        for _ in range(-(-len(data.y_train) // cfg.batch_size) * cfg.epochs):
            for stream, loop in zip(streams, loops):
                with torch.cuda.stream(stream):
                    next(loop)

    runs = {"lmc": lmc, "minimal": minimal}
    if pair:
        runs |= {"lmc pair": lambda: lmc_pair(False), "lmc pair concurrent": lambda: lmc_pair(True),
                 "minimal ×2 sequential": lambda: minimal((0, 1))}
        if device.type == "cuda":
            runs["minimal ×2 on 2 streams"] = minimal_streams
    for fn in runs.values():  # warm-up (allocator, cuDNN autotuning, lazy init)
        with contextlib.suppress(StopIteration):
            fn()
    best = {k: float("inf") for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            best[k] = min(best[k], time_it(fn, device))
    print(f"\n{label}: {n} images ({cfg.epochs} epoch(s)) per run, batch {cfg.batch_size}, {cfg.optimizer}, "
          f"device {device}")
    for k, t in best.items():
        images = n * (2 if "pair" in k or "×2" in k else 1)
        print(f"  {k:<26} {images / t:10.1f} images/s  ({t:.3f} s)")
    print(f"  ratio lmc / minimal:        {best['minimal'] / best['lmc']:.3f}")
    if pair:
        print(f"  pair speed-up vs 2× minimal: {best['minimal ×2 sequential'] / best['lmc pair']:.3f} (sequential), "
              f"{best['minimal ×2 sequential'] / best['lmc pair concurrent']:.3f} (train.concurrent_pair)")
        if "minimal ×2 on 2 streams" in best:
            streams = best["minimal ×2 sequential"] / best["minimal ×2 on 2 streams"]
            print(f"  2 streams vs 2× minimal:     {streams:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--widths", type=int, nargs="+", default=[1], help="ResNet-20 width multipliers")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per timed run (default: "
                        "24 on CPU, 200 on CUDA)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pair", action="store_true", help="also time a seed pair (see module docstring)")
    parser.add_argument("--no-mlp", action="store_true", help="skip the MLP on MNIST-1D")
    parser.add_argument("--no-resnet", action="store_true", help="skip ResNet-20")
    args = parser.parse_args()
    device = torch.device(args.device)
    steps = args.steps or (24 if device.type == "cpu" else 200)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=0.05, optimizer="sgd", momentum=0.9,
                      nesterov=True, weight_decay=5e-4, schedule="cosine", bf16=cuda, channels_last=cuda)
    images = random_images(steps * args.batch_size, device)
    for width in [] if args.no_resnet else args.widths:
        build = lambda w=width: build_model("resnet20", (3, 32, 32), 10, width=w)
        compare(f"ResNet-20 ×{width} on CIFAR-shaped random data", build, images, cfg, args.repeats, args.pair)
    if not args.no_mlp:
        mnist1d = load_dataset("mnist1d").to(device)
        mlp_cfg = TrainConfig(epochs=5, batch_size=128, lr=1e-3, optimizer="adam", schedule="cosine")
        build = lambda: build_model("mlp", mnist1d.input_shape, 10, width=512, depth=3)
        compare("MLP 3×512 on MNIST-1D", build, mnist1d, mlp_cfg, max(args.repeats, 5), args.pair)


if __name__ == "__main__":
    main()
