"""A sweep's jobs as one table, and the points of a barrier-against-setting figure.

One row per job (every folder under a sweep directory holding ``.hydra/overrides.yaml``): ``job`` (its
folder), ``status`` (``ok`` or ``failed``), ``overrides``, ``error`` (from the job's ``error.txt`` or the
last error line of its logs), ``experiment``, ``study``, ``seeds``, the stored models' hashes,
``reused``, and the study's tables flattened to columns such as ``barrier/weight_matching/test/loss``.
A failed job is listed, never skipped; a broken file in one job never stops the collection.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from lmc.report.results import read_results
from lmc.report.tracking import flatten

__all__ = ["collect", "job_row", "sweep_points", "sweep_value", "to_csv"]

FIRST_COLUMNS = ["job", "status", "overrides", "error", "experiment", "study", "seeds"]
NOT_TABLES = ("experiment", "study", "seeds", "config", "store", "reused", "diagnostics")  # not flattened to columns
PREFIXES = {"endpoints": "endpoint", "barriers": "barrier", "timings": "timing"}  # column prefix of a table


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
    row.update(status="ok", error="", experiment=results.get("experiment", ""), study=results.get("study", "pair"),
               seeds=" ".join(str(s) for s in results.get("seeds", [])))
    row.update(flatten("hash", results.get("store", {}).get("hashes", {})))
    row.update(flatten("reused", results.get("reused", {})))
    for key, table in results.items():  # the study's tables, then timings
        if key not in NOT_TABLES and isinstance(table, dict):
            row.update(flatten(PREFIXES.get(key, key), table))
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


_MISSING = object()


def _select(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def sweep_value(results: dict, x: str):
    """The value of the dotted config key ``x`` in a job's results (lists and dicts as strings); KeyError if absent."""
    value = _select(results.get("config", {}), x)
    if value is _MISSING:
        raise KeyError(x)
    return str(value) if isinstance(value, (list, dict)) else value


def sweep_points(sweep_dir: str | Path, x: str) -> list[dict]:
    """``{x, method, split, loss, error}`` for every finished job of a sweep and every barrier it holds.

    ``x`` is a dotted config key (``model.width``, ``spawn.step``, ``align.method``, ``seeds``...); a
    job whose config lacks it raises ``KeyError`` naming the key and the job."""
    sweep_dir = Path(sweep_dir)
    points = []
    for row in collect(sweep_dir):
        if row["status"] != "ok":
            continue
        results = read_results(sweep_dir / row["job"])
        try:
            value = sweep_value(results, x)
        except KeyError:
            raise KeyError(f"job {row['job']} has no setting '{x}' in its config") from None
        for method, per_split in results["barriers"].items():
            for split, b in per_split.items():
                points.append({"x": value, "method": method, "split": split, "loss": b["loss"], "error": b["error"]})
    return points
