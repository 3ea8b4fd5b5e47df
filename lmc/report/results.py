"""A run directory's ``results.json`` and the terminal summary. Figures and notebooks read only the run
directory's files (``results.json`` here, ``curves.csv`` through :mod:`lmc.io`)."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmc.errors import CorruptFile
from lmc.io import atomic_write

__all__ = ["link_models", "read_results", "run_results", "summary_table", "write_results"]


def run_results(experiment: str, study: str, seeds: list, config: Mapping, tables: Mapping, timings: Mapping,
                store_root: str, hashes: Mapping, reused: Mapping) -> dict:
    """``results.json`` of a run: the keys every study writes, with the study's own tables in the middle."""
    return {
        "experiment": experiment,
        "study": study,
        "seeds": list(seeds),
        "config": dict(config),
        **tables,
        "timings": dict(timings),
        "store": {"root": str(store_root), "hashes": dict(hashes)},
        "reused": dict(reused),
    }


def link_models(run_dir: Path, models: Mapping[str, Any]) -> None:
    """``checkpoints/model_<tag>.pt`` in the run directory: links to the stored models (``models`` maps a
    tag to anything with the store entry's ``path``), copies where links are not possible."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    for tag, stored in models.items():
        link = ckpt_dir / f"model_{tag}.pt"
        link.unlink(missing_ok=True)
        try:
            link.symlink_to((stored.path / "model.pt").resolve())
        except OSError:
            shutil.copyfile(stored.path / "model.pt", link)

def write_results(run_dir: str | os.PathLike, results: Mapping) -> Path:
    path = Path(run_dir) / "results.json"
    atomic_write(path, json.dumps(results, indent=2, sort_keys=False, default=_jsonable) + "\n")
    return path


def _jsonable(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def read_results(run_dir: str | os.PathLike) -> dict:
    """``results.json`` of a run directory; a truncated or corrupted file raises
    :class:`~lmc.errors.CorruptFile` naming it."""
    path = Path(run_dir) / "results.json"
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CorruptFile(f"{path} is truncated or corrupted ({type(exc).__name__}: {exc})") from None
    if not isinstance(results, dict) or "experiment" not in results:
        raise CorruptFile(f"{path} is not an lmc results file (no 'experiment' key)")
    return results


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
