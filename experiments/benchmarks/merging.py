"""Cost of each merging method against one evaluation pass of the model on the test set, in the same process.

    python experiments/benchmarks/merging.py                  # CPU: MLP 3×512 on MNIST-1D, ResNet-20, random images
    python experiments/benchmarks/merging.py --device cuda --children 6 --repeats 5
    python experiments/benchmarks/merging.py --quick          # seconds: the smoke test's sizes

For each model, ``--children`` children are made from one parent (the parent perturbed by small noise:
the timings do not depend on training) and every method of :mod:`lmc.core.merging` is timed:
the statistics a stage computes once per child and stores (Fisher diagonal over ``--stat-batches``
training batches, RegMean's Gram matrices over the same batches), the merges given those statistics,
the greedy soup (which evaluates its candidates on the validation split), the ensemble's evaluation on
the test set, SWA (with BatchNorm statistics recomputed where the model has BatchNorm) and a 3 × 3 plane
grid. Each is the best of ``--repeats`` runs, reported in seconds and as a multiple of one evaluation pass
(:func:`lmc.core.training.evaluate` of one model on the test set), the baseline timed the same way.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from lmc.core.data import load_dataset
from lmc.core.merging import (
    ensemble_evaluate,
    fisher_diagonal,
    fisher_merge,
    gram_matrices,
    greedy_soup,
    model_stock,
    regmean_merge,
    swa,
    uniform_soup,
)
from lmc.core.models import build_model
from lmc.core.normalization import has_batchnorm, reset_bn_stats
from lmc.core.plane import plane_grid
from lmc.core.training import evaluate, seeded_init


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up (allocator, lazy initialisation, cuDNN autotuning)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def children_of(parent: dict, count: int, scale: float = 0.01) -> list[dict]:
    out = []
    for i in range(count):
        g = torch.Generator().manual_seed(100 + i)
        out.append({k: v + scale * v.abs().mean() * torch.randn(v.shape, generator=g).to(v.device)
                    if v.is_floating_point() else v for k, v in parent.items()})
    return out


def compare(label: str, model, x_train, x_val, y_val, x_test, y_test, args) -> None:
    device = x_test.device
    parent = {k: v.detach().clone() for k, v in model.state_dict().items()}
    kids = children_of(parent, args.children)
    batches = [x_train[i * args.stat_batch_size : (i + 1) * args.stat_batch_size] for i in range(args.stat_batches)]
    bn = has_batchnorm(model)
    correct = (lambda params: reset_bn_stats(model, params, batches)) if bn else None
    fishers = [fisher_diagonal(model, sd, batches, labels=args.fisher_labels) for sd in kids]
    grams = [gram_matrices(model, sd, batches) for sd in kids]
    rows: dict[str, Callable[[], object]] = {
        "evaluation pass (baseline)": lambda: evaluate(model, x_test, y_test, params=parent),
        "uniform soup": lambda: uniform_soup(kids),
        "model stock": lambda: model_stock(parent, kids),
        "fisher merge": lambda: fisher_merge(kids, fishers),
        "regmean merge": lambda: regmean_merge(kids, grams),
        "greedy soup (val evaluations)": lambda: greedy_soup(model, kids, x_val, y_val, correct=correct),
        "ensemble (test evaluation)": lambda: ensemble_evaluate(model, kids, x_test, y_test),
        "swa" + (" + BatchNorm reset" if bn else ""): lambda: swa(kids, model=model, batches=batches),
        f"fisher diagonal, 1 child ({args.fisher_labels})": lambda: fisher_diagonal(model, kids[0], batches,
                                                                                    labels=args.fisher_labels),
        "gram matrices, 1 child": lambda: gram_matrices(model, kids[0], batches),
        "plane 3x3 (test)": lambda: plane_grid(model, parent, kids[0], kids[1], {"test": (x_test, y_test)},
                                               num_points=3, include_models=False,
                                               bn_batches=batches if bn else None),
    }
    times = {name: best_time(fn, device, args.repeats) for name, fn in rows.items()}
    base = times["evaluation pass (baseline)"]
    params = sum(v.numel() for v in parent.values() if v.is_floating_point())
    print(f"\n{label}: {params} parameters, {args.children} children, test set {len(y_test)}, validation "
          f"{len(y_val)}, statistics on {args.stat_batches}×{args.stat_batch_size} training inputs, device {device}")
    print(f"  {'method':<40} {'seconds':>10} {'× evaluation pass':>18}")
    for name, t in times.items():
        print(f"  {name:<40} {t:10.4f} {t / base:18.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--children", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stat-batches", type=int, default=4, help="training batches for Fisher and Gram statistics")
    parser.add_argument("--stat-batch-size", type=int, default=128)
    parser.add_argument("--fisher-labels", default="exact", choices=["exact", "sampled", "empirical"])
    parser.add_argument("--images", type=int, default=256, help="random CIFAR-shaped test images (and as many "
                        "validation images); one CPU core evaluates ResNet-20 at ~100 images/s")
    parser.add_argument("--data-root", default=None, help="dataset folder (default: $DATA_DIR, else ./data)")
    parser.add_argument("--quick", action="store_true", help="tiny models and data, one repeat (smoke test)")
    args = parser.parse_args()
    if args.fisher_labels == "empirical":
        parser.error("the benchmark times exact or sampled Fishers (no labels are passed)")
    device = torch.device(args.device)
    width, resnet_width, images = 512, 1, args.images
    if args.quick:
        args.children, args.repeats, args.stat_batches, args.stat_batch_size = 3, 1, 1, 16
        width, images = 32, 64
    # MLP 3×512 on MNIST-1D: the validation split is the last 500 training examples
    data = load_dataset("mnist1d", args.data_root).to(device)
    mlp = seeded_init(lambda: build_model("mlp", data.input_shape, data.num_classes, width=width, depth=3), 0)
    mlp = mlp.to(device)
    compare(f"MLP 3×{width} on MNIST-1D", mlp, data.x_train, data.x_train[-500:], data.y_train[-500:],
            data.x_test, data.y_test, args)
    # ResNet-20 (BatchNorm) on CIFAR-shaped random images
    g = torch.Generator().manual_seed(0)
    x_train = torch.randn(args.stat_batches * args.stat_batch_size, 3, 32, 32, generator=g).to(device)
    x = torch.randn(2 * images, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (2 * images,), generator=g).to(device)
    base = 4 if args.quick else 16
    resnet = seeded_init(lambda: build_model("resnet20", (3, 32, 32), 10, width=resnet_width, base_channels=base), 0)
    resnet = resnet.to(device)
    compare(f"ResNet-20 ×{resnet_width} (BatchNorm, {base} base channels) on CIFAR-shaped random data", resnet,
            x_train, x[:images], y[:images], x[images:], y[images:], args)


if __name__ == "__main__":
    main()
