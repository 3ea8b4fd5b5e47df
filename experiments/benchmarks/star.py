"""Cost of a Starlight step (lmc.core.star) against a plain training step of the same model, in one process.

    python experiments/benchmarks/star.py                         # CPU: MLP 3×512 on MNIST-1D, ResNet-20 ×1
    python experiments/benchmarks/star.py --device cuda --epochs 4

Each run trains the same model (same init, data order and optimiser) for a few epochs: ``plain`` with
:func:`lmc.core.training.train`, ``star`` with :func:`lmc.core.star.train_star` against ``--anchors``
anchors (t ~ U(0, 1), the paper's default), ``star mu=1`` with θ's own loss mixed in (``mu_star=1``: a
second forward and backward pass). A star step interpolates every parameter, runs the interpolated
network through ``torch.func.functional_call`` and backpropagates through the interpolation; after each
epoch a model with BatchNorm gets its statistics recomputed on the training set (one forward pass over
it). The ``star steps`` row leaves that epoch-end pass out (it is timed apart, ``bn pass``). Runs are
interleaved and repeated; the best of the repeats counts. The goal is a star step within 1.5× a plain
one for the MLP on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch

from lmc.core.data import Dataset, load_dataset
from lmc.core.models import build_model
from lmc.core.normalization import has_batchnorm
from lmc.core.star import StarConfig, StarObjective, train_star
from lmc.core.training import TrainConfig, seeded_init, train

GOAL = 1.5  # the target: a star step at most this many plain steps (MLP, CPU)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_images(n: int, device: torch.device) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return Dataset("random-cifar", x, y, x[:256], y[:256], 10).to(device)


@contextlib.contextmanager
def timed_epoch_ends(device: torch.device, into: list[float]):
    """Adds the seconds spent in :meth:`StarObjective.epoch_end` (θ's BatchNorm pass) to ``into[0]``."""
    original = StarObjective.epoch_end

    def epoch_end(self, epoch):
        sync(device)
        start = time.perf_counter()
        original(self, epoch)
        sync(device)
        into[0] += time.perf_counter() - start

    StarObjective.epoch_end = epoch_end
    try:
        yield
    finally:
        StarObjective.epoch_end = original


def compare(label: str, build, data: Dataset, cfg: TrainConfig, anchors: int, repeats: int) -> tuple[float, float]:
    """Times the runs, prints their table and returns the star/plain time ratios: the steps alone, and with
    the epoch-end BatchNorm passes."""
    device = data.x_train.device
    anchor_sds = [seeded_init(build, 100 + i).to(device).state_dict() for i in range(anchors)]
    steps = -(-len(data.y_train) // cfg.batch_size) * cfg.epochs
    bn_seconds = [0.0]

    def plain():
        train(seeded_init(build, 0).to(device), data, cfg, data_seed=0, progress=False)

    def star(mu: float = 0.0):
        train_star(seeded_init(build, 0).to(device), anchor_sds, data, cfg, StarConfig(mu_star=mu), data_seed=0,
                   progress=False)

    runs = {"plain": plain, "star": star, "star mu=1": lambda: star(1.0)}
    for fn in runs.values():  # warm-up (allocator, lazy initialisation, cuDNN autotuning)
        fn()
    best = dict.fromkeys(runs, float("inf"))
    best_bn = float("inf")
    for _ in range(repeats):
        for name, fn in runs.items():
            bn_seconds[0] = 0.0
            with timed_epoch_ends(device, bn_seconds):
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                seconds = time.perf_counter() - start
            best[name] = min(best[name], seconds)
            if name == "star":
                best_bn = min(best_bn, bn_seconds[0])
    batchnorm = has_batchnorm(build())
    rows = {**best}
    if batchnorm:
        rows = {"plain": best["plain"], "star": best["star"], "star steps": best["star"] - best_bn,
                "bn pass": best_bn, "star mu=1": best["star mu=1"]}
    print(f"\n{label}: {steps} steps per run ({cfg.epochs} epochs, batch {cfg.batch_size}, {cfg.optimizer}), "
          f"{anchors} anchors, device {device}, {torch.get_num_threads()} thread(s)")
    for name, seconds in rows.items():
        print(f"  {name:<24} {1000 * seconds / steps:9.3f} ms/step  {seconds / best['plain']:6.2f}x")
    bn = best_bn if batchnorm else 0.0
    return (best["star"] - bn) / best["plain"], best["star"] / best["plain"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--only", choices=["mlp", "resnet20"], default=None, help="one model only")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per timed run")
    parser.add_argument("--images", type=int, default=None,
                        help="random CIFAR-shaped training images for ResNet-20 (default: 512 CPU, 8192 CUDA)")
    parser.add_argument("--anchors", type=int, default=3)
    parser.add_argument("--width", type=int, default=512, help="MLP width (3 hidden layers)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if min(args.epochs, args.anchors, args.repeats, args.width) < 1:
        sys.exit(f"--epochs, --anchors, --repeats and --width must be positive, got {args.epochs}, {args.anchors}, "
                 f"{args.repeats}, {args.width}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    ratios = {}
    if args.only in (None, "mlp"):
        mnist1d = load_dataset("mnist1d").to(device)
        cfg = TrainConfig(epochs=args.epochs, batch_size=128, lr=1e-3, optimizer="adam", schedule="cosine")
        build = lambda: build_model("mlp", mnist1d.input_shape, 10, width=args.width, depth=3)  # noqa: E731
        name = f"MLP 3×{args.width}"
        ratios[name] = compare(f"{name} on MNIST-1D", build, mnist1d, cfg, args.anchors, args.repeats)
    if args.only in (None, "resnet20"):
        images = random_images(args.images or (8192 if cuda else 512), device)
        cfg = TrainConfig(epochs=args.epochs, batch_size=128, lr=0.05, optimizer="sgd", momentum=0.9,
                          weight_decay=5e-4, bf16=cuda, channels_last=cuda)
        build = lambda: build_model("resnet20", (3, 32, 32), 10, width=1)  # noqa: E731
        ratios["ResNet-20 ×1"] = compare("ResNet-20 ×1 (BatchNorm) on CIFAR-shaped random data", build, images, cfg,
                                         args.anchors, args.repeats)
    print()
    for name, (steps_only, with_bn) in ratios.items():
        verdict = "within" if steps_only <= GOAL else "above"
        bn = f"; {with_bn:.2f}x with the epoch-end BatchNorm passes" if with_bn != steps_only else ""
        print(f"{name}: a star step costs {steps_only:.2f}x a plain step ({verdict} the {GOAL}x goal{bn})")


if __name__ == "__main__":
    main()
