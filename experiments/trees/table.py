"""Kanoh & Sugiyama's barrier table from finished ``study=trees`` runs: a markdown table and its figure.

    python experiments/trees/table.py SWEEP_OR_RUN_DIR [...] [--figure barriers_table.png]

Reads every run directory's ``results.json`` (a sweep folder: all of its finished jobs; nothing is trained
or computed) and prints one row per dataset and model: the chosen learning rate, the mean test accuracy
and, per variant, the test accuracy barrier in percentage points (mean ± std over the seed pairs). The
figure draws the same numbers as bars (:func:`lmc.studies.trees.plot_table`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmc.report.results import read_results
from lmc.report.sweep import collect
from lmc.studies.trees import plot_table, table_rows

VARIANTS = ("naive", "perm", "perm+flip", "perm+flip+order", "activation")


def runs(paths: list[Path]) -> list[dict]:
    found = []
    for path in paths:
        if (path / "results.json").is_file():
            found.append(read_results(path))
            continue
        found += [read_results(path / row["job"]) for row in collect(path) if row["status"] == "ok"]
    return [r for r in found if r.get("study") == "trees"]


def markdown(rows: list[dict]) -> str:
    lines = ["| data | model | lr | test acc (%) | " + " | ".join(VARIANTS) + " |",
             "|---|---|---|---|" + "---|" * len(VARIANTS)]
    for r in rows:
        cells = [f"{r[v][0]:.2f} ± {r[v][1]:.2f}" if v in r else "–" for v in VARIANTS]
        lines.append(f"| {r['data']} | {r['model']} | {r['lr']:g} | {r['test_acc']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep folders or run directories of study=trees")
    parser.add_argument("--figure", type=Path, default=None, help="write the bar figure here")
    args = parser.parse_args()
    rows = table_rows(runs(args.dirs))
    if not rows:
        raise SystemExit("error: no finished study=trees run under " + ", ".join(map(str, args.dirs)))
    print(markdown(rows))
    if args.figure:
        print(plot_table(rows, args.figure))


if __name__ == "__main__":
    main()
