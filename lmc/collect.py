"""Gather a sweep's results into one table: ``python -m lmc.collect SWEEP_DIR [-o table.csv]``.

One row per job (:mod:`lmc.report.sweep` says which columns), failed jobs included, written atomically
(default ``SWEEP_DIR/results.csv``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmc.io import atomic_write
from lmc.report.sweep import collect, to_csv

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmc.collect", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder, e.g. multirun/mlp_mnist1d/<time>")
    parser.add_argument("-o", "--output", type=Path, help="CSV file to write (default SWEEP_DIR/results.csv)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: sweep directory '{args.sweep_dir}' does not exist", file=sys.stderr)
        return 2
    rows = collect(args.sweep_dir)
    if not rows:
        print(f"error: no jobs under '{args.sweep_dir}' (no */.hydra/overrides.yaml)", file=sys.stderr)
        return 2
    out = args.output or args.sweep_dir / "results.csv"
    atomic_write(out, to_csv(rows))
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"{len(rows)} jobs ({len(rows) - len(failed)} ok, {len(failed)} failed) -> {out}")
    for r in failed:
        print(f"  failed {r['job']}: {r['overrides']}: {r['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
