"""Gather a sweep's results into one table: ``python -m lmc.collect SWEEP_DIR [-o table.csv]``.

One row per job (every folder under SWEEP_DIR holding ``.hydra/overrides.yaml``): ``job`` (its folder),
``status`` (``ok`` or ``failed``), ``overrides``, ``error`` (from the job's ``error.txt`` or the last
error line of its logs), ``experiment``, ``seeds``, the stored models' hashes, ``reused``, and the
endpoints, barriers, layer-wise barriers and timings flattened to columns such as
``barrier/weight_matching/test/loss``. A failed job is listed, never skipped; a broken file in one
job never stops the collection. Written atomically (default ``SWEEP_DIR/results.csv``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from lmc.io import atomic_write
from lmc.report.tracking import flatten

__all__ = ["collect", "job_row", "main"]

FIRST_COLUMNS = ["job", "status", "overrides", "error", "experiment", "seeds"]


def _overrides(job_dir: Path) -> str:
    try:
        lines = (job_dir / ".hydra" / "overrides.yaml").read_text().splitlines()
    except OSError:
        return ""
    return " ".join(line[2:].strip() for line in lines if line.startswith("- "))


def _error(job_dir: Path) -> str:
    """The job's one-line error: ``error.txt`` (written by lmc.run), else the last error line of a log."""
    err = job_dir / "error.txt"
    if err.is_file():
        lines = err.read_text(errors="replace").splitlines()
        return lines[0].removeprefix("error: ") if lines else ""
    for log in sorted(job_dir.glob("*.log")):  # Hydra's job log
        found = [ln.strip() for ln in log.read_text(errors="replace").splitlines()
                 if "error" in ln.lower() or "exception" in ln.lower()]
        if found:
            return found[-1]
    return "no results.json (job did not finish)"


def job_row(job_dir: Path, sweep_dir: Path) -> dict:
    row = {"job": str(job_dir.relative_to(sweep_dir)), "overrides": _overrides(job_dir)}
    try:
        results = json.loads((job_dir / "results.json").read_text())
    except FileNotFoundError:
        return {**row, "status": "failed", "error": _error(job_dir)}
    except (OSError, ValueError) as exc:
        return {**row, "status": "failed", "error": f"results.json unreadable ({type(exc).__name__})"}
    row.update(status="ok", error="", experiment=results.get("experiment", ""),
               seeds=" ".join(str(s) for s in results.get("seeds", [])))
    row.update(flatten("hash", results.get("store", {}).get("hashes", {})))
    row.update(flatten("reused", results.get("reused", {})))
    for key, prefix in (("endpoints", "endpoint"), ("barriers", "barrier"), ("layerwise", "layerwise"),
                        ("timings", "timing")):
        row.update(flatten(prefix, results.get(key) or {}))
    return row


def collect(sweep_dir: str | Path) -> list[dict]:
    """One row per job folder under ``sweep_dir``, sorted by job (numerically where possible)."""
    sweep_dir = Path(sweep_dir)
    jobs = sorted({p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml")},
                  key=lambda p: [(0, int(s)) if s.isdigit() else (1, s) for s in p.relative_to(sweep_dir).parts])
    return [job_row(job, sweep_dir) for job in jobs]


def to_csv(rows: list[dict]) -> str:
    columns = list(FIRST_COLUMNS)
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


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
