"""Reading and writing a run directory's contract files (``results.json``, ``curves.csv``) and the
terminal summary. Figures and notebooks read only these files."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["CURVE_COLUMNS", "atomic_write", "read_curves", "read_results", "summary_table", "write_curves",
           "write_results"]

CURVE_COLUMNS = ("method", "layer", "split", "alpha", "loss", "acc")


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, then rename it over ``path``: readers see the
    old file or the new one, never a partial one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data, newline="")  # written as given (csv's line endings stay as csv makes them)
    os.replace(tmp, path)


def write_results(run_dir: str | os.PathLike, results: Mapping) -> Path:
    path = Path(run_dir) / "results.json"
    atomic_write(path, json.dumps(results, indent=2, sort_keys=False, default=_jsonable) + "\n")
    return path


def _jsonable(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def read_results(run_dir: str | os.PathLike) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


def write_curves(run_dir: str | os.PathLike, rows: list[Mapping]) -> Path:
    path = Path(run_dir) / "curves.csv"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CURVE_COLUMNS)
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(float(r[k])) if k in ("alpha", "loss", "acc") else r[k]) for k in CURVE_COLUMNS})
    atomic_write(path, buf.getvalue())
    return path


def read_curves(run_dir: str | os.PathLike) -> list[dict]:
    with open(Path(run_dir) / "curves.csv", newline="") as f:
        return [
            {**r, "alpha": float(r["alpha"]), "loss": float(r["loss"]), "acc": float(r["acc"])}
            for r in csv.DictReader(f)
        ]


def _fmt(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def summary_table(results: Mapping) -> str:
    """A plain-text summary: endpoints, barriers per method and split, worst layer-wise barriers."""
    lines = [f"experiment {results['experiment']}  seeds {results['seeds']}"]
    lines.append("endpoints      split   loss     acc")
    for m in ("a", "b"):
        for split, v in results["endpoints"][m].items():
            lines.append(f"  model {m}      {split:<6}  {_fmt(v['loss'])}  {_fmt(v['acc'])}")
    header = "barriers                 split   loss     error    loss_mid error_mid loss_frk error_frk"
    lines.append(header)
    for method, per_split in results["barriers"].items():
        for split, b in per_split.items():
            lines.append(
                f"  {method:<22} {split:<6}  {_fmt(b['loss'])}  {_fmt(b['error'])}  {_fmt(b['loss_midpoint'])}"
                f"   {_fmt(b['error_midpoint'])}   {_fmt(b['loss_frankle'])}  {_fmt(b['error_frankle'])}"
            )
    if results.get("layerwise"):
        lines.append("layer-wise barriers (test loss / test error)")
        for method, per_layer in results["layerwise"].items():
            cells = []
            for layer, per_split in per_layer.items():
                b = per_split.get("test") or next(iter(per_split.values()))
                cells.append(f"{layer}: {_fmt(b['loss'])}/{_fmt(b['error'])}")
            lines.append(f"  {method:<22} " + "  ".join(cells))
    return "\n".join(lines)
