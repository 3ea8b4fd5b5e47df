"""Regenerate figures from stored results, offline and without W&B.

    python -m lmc.figures RUN_DIR [RUN_DIR ...]            # each run's figures (its study's: curves.png, ...)
    python -m lmc.figures --sweep SWEEP_DIR --x model.width  # barrier against a swept setting

A run's figures are its study's (``results.json`` names the study), drawn from its ``curves.csv`` and
``results.json``; a sweep's figure reads every finished
job's ``results.json`` (the jobs :mod:`lmc.collect` lists), takes the swept setting ``--x`` from the
job's resolved config and plots the barriers of every method, mean ± std over the jobs sharing an
``--x`` value (e.g. several seed pairs), to ``SWEEP_DIR/barrier_vs_<x>.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmc.errors import ConfigError, CorruptFile, WriteFailed
from lmc.io import read_curves
from lmc.report.plotting import plot_sweep
from lmc.report.results import read_results
from lmc.report.sweep import collect, sweep_points, sweep_value
from lmc.studies import study_for_results

__all__ = ["main"]


def _runs(run_dirs: list[Path]) -> int:
    status = 0
    for run_dir in run_dirs:
        missing = [f for f in ("results.json", "curves.csv") if not (run_dir / f).is_file()]
        if missing:
            print(f"error: {run_dir} is not a run directory (missing {', '.join(missing)})", file=sys.stderr)
            status = 2
            continue
        try:
            results = read_results(run_dir)
            rows = read_curves(run_dir)
            study = study_for_results(results)
        except (ConfigError, CorruptFile) as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 2
            continue
        try:
            paths = study.figures(run_dir, results, rows)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            print(f"error: {run_dir / 'results.json'} lacks what the {study.name} figures need "
                  f"({type(exc).__name__}: {exc})", file=sys.stderr)
            status = 2
            continue
        except WriteFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
            continue
        for path in paths:
            print(path)
    return status


def _sweep(sweep_dir: Path, x: str, split: str) -> int:
    if not sweep_dir.is_dir():
        print(f"error: sweep directory '{sweep_dir}' does not exist", file=sys.stderr)
        return 2
    try:
        points = sweep_points(sweep_dir, x)
    except KeyError as exc:
        print(f"error: {exc.args[0]}; pass --x as a dotted key of the jobs' config, e.g. model.width",
              file=sys.stderr)
        return 2
    if not any(p["split"] == split for p in points):
        print(f"error: no finished job with '{split}' barriers under '{sweep_dir}'", file=sys.stderr)
        return 2
    title = f"barriers against {x}: {sweep_dir}"
    print(plot_sweep(points, x, sweep_dir / f"barrier_vs_{x}.png", split=split, title=title))
    for path in _study_sweep_figures(sweep_dir, x, split):
        print(path)
    return 0


def _study_sweep_figures(sweep_dir: Path, x: str, split: str) -> list[Path]:
    """A study's own figure against the swept setting (its ``sweep_figure(sweep_dir, jobs, x, split)``, where
    ``jobs`` are ``(x value, results)`` of its finished jobs), for every study of the sweep that has one."""
    by_study: dict = {}
    for row in collect(sweep_dir):
        if row["status"] == "ok":
            results = read_results(sweep_dir / row["job"])
            value = sweep_value(results, x)
            by_study.setdefault(results.get("study", "pair"), []).append((value, results))
    paths = []
    for name, jobs in by_study.items():
        figure = getattr(study_for_results({"study": name}), "sweep_figure", None)
        if figure is not None:
            paths.append(figure(sweep_dir, jobs, x, split))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmc.figures", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("run_dirs", nargs="*", type=Path, help="run directories holding results.json and curves.csv")
    parser.add_argument("--sweep", type=Path, help="a multirun folder: plot barriers against --x")
    parser.add_argument("--x", help="the swept setting, a dotted config key (with --sweep)")
    parser.add_argument("--split", default="test", choices=("train", "test"), help="split of the barriers (--sweep)")
    args = parser.parse_args(argv)
    if args.sweep is None and not args.run_dirs:
        parser.error("give run directories, or --sweep SWEEP_DIR --x KEY")
    if args.sweep is not None and not args.x:
        parser.error("--sweep needs --x, the swept setting (e.g. --x model.width)")
    status = _runs(args.run_dirs)
    if args.sweep is not None:
        status = max(status, _sweep(args.sweep, args.x, args.split))
    return status


if __name__ == "__main__":
    sys.exit(main())
