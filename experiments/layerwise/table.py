"""The README's tables from finished runs of study=layerwise: mean ± std over the runs given.

    python experiments/layerwise/table.py RUN_DIR [RUN_DIR ...] [--split train] [--metric loss_midpoint]

Reads each run's results.json only. Prints: endpoints; whole-model barrier; single-layer barrier per layer
(into A, into B); cumulative barrier of the first k layers per order; windows; averaging vs random direction;
the single-layer barrier at a few epochs (the heatmap's columns), all mean ± std over runs (error in points).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lmc.studies.layerwise import epochs_of, layers_of, orders_of, sets_of


def spread(values, scale=1.0) -> str:
    v = scale * np.asarray(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--split", default="train")
    parser.add_argument("--metric", default="loss_midpoint")
    parser.add_argument("--method", default="naive")
    args = parser.parse_args()
    results = [json.loads((run / "results.json").read_text()) for run in args.runs]
    split, metric, method = args.split, args.metric, args.method
    scale = 100 if metric.startswith("error") else 1
    layers = list(layers_of(results[0]))
    print(f"{len(results)} runs; {split} {metric} (method {method})")
    for tag in "ab":
        print(f"model {tag}: train acc {spread([r['endpoints'][tag]['train']['acc'] for r in results], 100)}  "
              f"test acc {spread([r['endpoints'][tag]['test']['acc'] for r in results], 100)}")

    def rec(r, **key):
        out = [x for x in r["layerwise"] if x["method"] == method and x["split"] == split
               and all(x[k] == v for k, v in key.items())]
        assert len(out) == 1, (key, len(out))
        return out[0][metric]

    print(f"whole model: {spread([rec(r, kind='whole', epoch='') for r in results], scale)}"
          f"   (max over α, loss: {spread([r['barriers'][method][split]['loss'] for r in results])})")
    print("| layer | into A | into B |")
    for layer in layers:
        print(f"| {layer} | " + " | ".join(spread([rec(r, kind='single', set=layer, base=b, epoch='') for r in results],
                                                 scale) for b in "ab") + " |")
    orders = list(orders_of(results[0]))
    print("| order (into A) | " + " | ".join(f"k={k}" for k in range(1, len(layers) + 1)) + " |")
    for base in "ab":
        for order in orders:
            cells = [spread([rec(r, set=f"cum_{order}_{k}", base=base, epoch='') for r in results], scale)
                     for k in range(1, len(layers) + 1)]
            names = "→".join(orders_of(results[0])[order]) if not order.startswith("random") else "seeded"
            print(f"| {order} ({names}) into {base.upper()} | " + " | ".join(cells) + " |")
    windows = [s for s, info in sets_of(results[0]).items() if info["kind"] == "window"]
    for w in windows:
        print(f"| {w} | " + " | ".join(spread([rec(r, set=w, base=b, epoch='') for r in results], scale)
                                        for b in "ab") + " |")
    print("| layer | averaging into A | random into A | averaging into B | random into B |")
    for layer in layers:
        cells = []
        for base in "ab":
            entries = [next(e for e in r["random_direction"] if (e["method"], e["layer"], e["base"], e["epoch"],
                                                                   e["split"]) == (method, layer, base, "", split))
                       for r in results]
            cells += [spread([e[f"averaging_{metric}"] for e in entries], scale),
                      spread([e[f"random_{metric}"] for e in entries], scale)]
        print(f"| {layer} | " + " | ".join(cells) + " |")
    epochs = epochs_of(results[0])
    if epochs:
        shown = sorted({epochs[0], epochs[1] if len(epochs) > 1 else epochs[0], epochs[len(epochs) // 6],
                        epochs[len(epochs) // 3], epochs[len(epochs) // 2], epochs[-1]})
        print("| layer (into A) | " + " | ".join(f"epoch {e}" for e in shown) + " |")
        for base in "ab":
            for layer in layers:
                print(f"| {layer} into {base.upper()} | " + " | ".join(
                    spread([rec(r, kind='single', set=layer, base=base, epoch=e) for r in results], scale)
                    for e in shown) + " |")


        print("| whole model | " + " | ".join(spread([rec(r, kind='whole', epoch=e) for r in results], scale)
                                             for e in shown) + " |")


if __name__ == "__main__":
    main()
