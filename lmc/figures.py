"""Regenerate a run's plots from its stored files, offline: ``python -m lmc.figures RUN_DIR [...]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmc.plotting import plot_run
from lmc.results import read_curves, read_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmc.figures", description=__doc__)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories holding results.json and curves.csv")
    args = parser.parse_args(argv)
    status = 0
    for run_dir in args.run_dirs:
        missing = [f for f in ("results.json", "curves.csv") if not (run_dir / f).is_file()]
        if missing:
            print(f"error: {run_dir} is not a run directory (missing {', '.join(missing)})", file=sys.stderr)
            status = 2
            continue
        for path in plot_run(run_dir, read_results(run_dir), read_curves(run_dir)):
            print(path)
    return status


if __name__ == "__main__":
    sys.exit(main())
