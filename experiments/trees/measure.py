"""Kanoh & Sugiyama's (ICLR 2025) barrier table, scaled to a few CPU minutes on an embedded table.

    python experiments/trees/measure.py [--data digits] [--trees 256] [--epochs 50] [--pairs 4] [--out FILE]

The paper's protocol: Adam, batch 512, a constant learning rate picked among {1e-2, 1e-3, 1e-4} by the
training accuracy of the seed-0 model, ``--epochs`` epochs; models trained from seeds 2k and 2k+1 form
pair k; 25 λ; the accuracy barrier of the paper's Eq. 1, ``max_λ [λ·acc(θ_A) + (1−λ)·acc(θ_B) −
acc(λθ_A + (1−λ)θ_B)]`` in percentage points (lmc's error barrier), on the test split. Rows: each tree
model with its invariance ablations (``naive``: no alignment; weight matching with ``perm``,
``perm+flip``, ``perm+flip+order`` where the kind has them; activation matching with all invariances
on 512 training points), and an MLP (two hidden layers of 256 ReLU units) with Git Re-Basin's weight
matching. Prints mean ± std over the pairs and writes every number to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from lmc.core.barriers import barrier
from lmc.core.data.tabular import load_tabular
from lmc.core.interpolation import alpha_grid, sweep
from lmc.core.models import build_model
from lmc.core.models.trees import SoftTreeEnsemble
from lmc.core.permutation import apply_permutation, permutation_spec, weight_matching
from lmc.core.permutation.trees import ablations
from lmc.core.training import TrainConfig, evaluate, seeded_init, train

LEARNING_RATES = (1e-2, 1e-3, 1e-4)
MODELS = {  # row name -> (builder kwargs); "mlp" is lmc's MLP
    "oblivious D=2": dict(kind="oblivious", depth=2),
    "non-oblivious D=2": dict(kind="perfect", depth=2),
    "non-oblivious D=3": dict(kind="perfect", depth=3),
    "modified decision list D=2": dict(kind="modified_decision_list", depth=2),
    "decision list D=2": dict(kind="decision_list", depth=2),
    "MLP 2x256": None,
}


def builder(options, data, trees):
    if options is None:
        return lambda: build_model("mlp", data.input_shape, data.num_classes, width=256, depth=2)
    return lambda: SoftTreeEnsemble(data.input_shape, data.num_classes, trees=trees, **options)


def accuracy_barrier(model, sd_a, sd_b, data, alphas) -> float:
    rows = sweep(model, sd_a, sd_b, alphas, {"test": data.split("test")}, "pair")
    error = [1 - r["acc"] for r in rows]
    return 100 * barrier([r["alpha"] for r in rows], error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="digits")
    parser.add_argument("--root", default=None, help="data root (MNIST-1D's cache, OpenML files)")
    parser.add_argument("--trees", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--models", nargs="+", choices=list(MODELS),
                        default=[m for m in MODELS if m != "decision list D=2"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_tabular(args.data, root=args.root, seed=0)
    alphas = alpha_grid(25)
    print(f"{args.data}: {len(data.y_train)} train / {len(data.y_test)} test rows, {data.input_shape[0]} features, "
          f"{data.num_classes} classes; M = {args.trees} trees, {args.epochs} epochs, {args.pairs} pairs", flush=True)
    results = {"data": args.data, "trees": args.trees, "epochs": args.epochs, "pairs": args.pairs, "models": {}}
    for name in args.models:
        start = time.perf_counter()
        build = builder(MODELS[name], data, args.trees)

        def trained(seed, lr, build=build):
            model = seeded_init(build, seed)
            cfg = TrainConfig(epochs=args.epochs, batch_size=512, lr=lr, optimizer="adam", schedule="constant")
            train(model, data, cfg, data_seed=seed, progress=False)
            return model

        train_acc = {lr: evaluate(trained(0, lr), *data.split("train"))[1] for lr in LEARNING_RATES}
        lr = max(LEARNING_RATES, key=lambda r: train_acc[r])
        models = [trained(seed, lr) for seed in range(2 * args.pairs)]
        test_acc = [evaluate(m, *data.split("test"))[1] for m in models]
        rows: dict[str, list[float]] = {}
        for k in range(args.pairs):
            model_a, model_b = models[2 * k], models[2 * k + 1]
            sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
            aligned = {"naive": sd_b}
            if MODELS[name] is None:
                spec = permutation_spec(model_a, data.x_train[:2])
                aligned["WM perm"] = apply_permutation(spec, weight_matching(spec, sd_a, sd_b), sd_b)
            else:
                sym = model_a.symmetry()
                for label, invariances in ablations(sym).items():
                    aligned[f"WM {label}"] = sym.apply(sym.weight_matching(sd_a, sd_b, invariances), sd_b)
                aligned["AM all"] = sym.apply(sym.align("activation_matching", model_a, model_b, data.x_train,
                                                        seed=k), sd_b)
            for label, sd in aligned.items():
                same = evaluate(model_b, *data.split("test"), params=sd)[1]
                assert abs(same - test_acc[2 * k + 1]) < 1e-6, f"{name} {label}: aligned B computes another function"
                rows.setdefault(label, []).append(accuracy_barrier(model_a, sd_a, sd, data, alphas))
        seconds = time.perf_counter() - start
        results["models"][name] = {"lr": lr, "train_acc_by_lr": train_acc, "test_acc": test_acc, "barriers": rows,
                                   "seconds": seconds}
        summary = "  ".join(f"{label} {np.mean(v):.2f}±{np.std(v):.2f}" for label, v in rows.items())
        print(f"{name:<28} lr {lr:g}  test acc {100 * np.mean(test_acc):.1f}%  barrier (pp): {summary}  "
              f"[{seconds:.0f} s]", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
