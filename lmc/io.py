"""File I/O shared by every layer: atomic writes, sha256-verified checkpoint files, a folder of
training checkpoints, and the curves table (``curves.csv``).

Every file is written to a temporary name and renamed into place, so a killed process leaves the old
file or the new one, never half of one. Each checkpoint's sha256 is recorded by whoever points to it
(``latest.json`` in a checkpoint folder, ``meta.json`` in a store entry); a truncated or corrupted
file is detected on read and raised as :class:`lmc.errors.CorruptCheckpoint` naming its path.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lmc.errors import CorruptCheckpoint, CorruptFile, WriteFailed

__all__ = ["CURVE_COLUMNS", "CheckpointDir", "atomic_write", "load_verified", "read_curves", "save_atomic",
           "write_curves"]

CURVE_COLUMNS = ("method", "layer", "split", "alpha", "loss", "acc")


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, flush it to disk, then rename it over ``path``:
    readers see the old file or the new one, never a partial one. A failed write (a full disk, a
    read-only folder) removes the temporary file, leaves ``path`` as it was and raises
    :class:`~lmc.errors.WriteFailed` naming the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode())  # as given: csv's line endings stay
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise WriteFailed(f"cannot write {path} ({exc.strerror or exc}); the previous file, if any, is "
                          "unchanged") from None


def save_atomic(path: str | os.PathLike, obj: Any) -> str:
    """``torch.save(obj)`` to ``path`` atomically; returns the file's sha256 (hex)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    atomic_write(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def load_verified(path: str | os.PathLike, sha256: str | None = None, map_location: Any = "cpu") -> Any:
    """``torch.load(path)``, checking the file's sha256 when given; any failure is a CorruptCheckpoint."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorruptCheckpoint(f"checkpoint {path} cannot be read ({exc.strerror or exc})") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise CorruptCheckpoint(f"checkpoint {path} is corrupted or truncated (sha256 mismatch, {len(data)} bytes)")
    try:
        obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a broken file
        raise CorruptCheckpoint(f"checkpoint {path} is corrupted or truncated ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise CorruptCheckpoint(f"checkpoint {path} is corrupted (holds a {type(obj).__name__}, not a dict)")
    return obj


class CheckpointDir:
    """Training checkpoints of one model: ``step_<N>.pt`` files, ``latest.json`` pointing to the newest
    and ``kept.json`` listing those kept for later analyses (file → sha256).

    Writing a checkpoint writes its file, then (if kept) ``kept.json``, then atomically replaces
    ``latest.json`` (step, file, sha256), then removes the previous checkpoint unless it is kept; at
    every instant ``latest.json`` names a complete file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def pointer(self) -> Path:
        return self.path / "latest.json"

    def file(self, step: int) -> Path:
        return self.path / f"step_{step:08d}.pt"

    @property
    def kept_registry(self) -> Path:
        return self.path / "kept.json"

    def write(self, step: int, state: dict, keep: bool = False) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        previous = self._read_pointer()
        path = self.file(step)
        sha = save_atomic(path, state)
        if keep:
            atomic_write(self.kept_registry, json.dumps({**self._kept_names(), path.name: sha}, indent=1) + "\n")
        atomic_write(self.pointer, json.dumps({"step": step, "file": path.name, "sha256": sha}) + "\n")
        if previous and previous["file"] != path.name and previous["file"] not in self._kept_names():
            (self.path / previous["file"]).unlink(missing_ok=True)
        return path

    def _kept_names(self) -> dict[str, str]:
        try:
            return json.loads(self.kept_registry.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            raise CorruptCheckpoint(f"checkpoint registry {self.kept_registry} is corrupted") from None

    def _read_pointer(self) -> dict | None:
        if not self.pointer.exists():
            return None
        try:
            pointer = json.loads(self.pointer.read_text())
            pointer["file"], pointer["sha256"]  # noqa: B018 - both keys must exist
        except (ValueError, KeyError, TypeError):
            raise CorruptCheckpoint(f"checkpoint pointer {self.pointer} is corrupted") from None
        return pointer

    def adopt(self, other: CheckpointDir, steps: set[int]) -> None:
        """Move ``other``'s kept checkpoints at ``steps`` into this folder's kept ones (files first, then
        ``kept.json``: a crash in between leaves unlisted files, never a listed missing one)."""
        self.path.mkdir(parents=True, exist_ok=True)
        moved = {}
        for step, (path, sha) in other.kept().items():
            if step in steps:
                os.replace(path, self.file(step))
                moved[self.file(step).name] = sha
        atomic_write(self.kept_registry, json.dumps({**self._kept_names(), **moved}, indent=1) + "\n")

    def drop_latest(self) -> None:
        """Remove the newest checkpoint (once the finished model is stored elsewhere), unless kept."""
        pointer = self._read_pointer()
        if pointer is None:
            return
        if pointer["file"] not in self._kept_names():
            (self.path / pointer["file"]).unlink(missing_ok=True)
        self.pointer.unlink()

    def kept(self) -> dict[int, tuple[Path, str]]:
        """Checkpoints kept for later analyses (``train.keep_checkpoints``): step → (file, sha256)."""
        return {int(name[5:13]): (self.path / name, sha) for name, sha in sorted(self._kept_names().items())}

    def latest(self) -> dict | None:
        """The newest checkpoint's contents (``None`` when there is none); CorruptCheckpoint if broken."""
        pointer = self._read_pointer()
        if pointer is None:
            return None
        return load_verified(self.path / pointer["file"], pointer["sha256"])

    def latest_file(self) -> Path | None:
        pointer = self._read_pointer()
        return None if pointer is None else self.path / pointer["file"]


def write_curves(run_dir: str | os.PathLike, rows: list[Mapping]) -> Path:
    """``curves.csv``: one row per evaluation, columns ``CURVE_COLUMNS`` first, then any other column a
    study's rows carry (a layer set, a base model, an epoch, a pair type…) in order of appearance; a row
    without such a column leaves it empty."""
    path = Path(run_dir) / "curves.csv"
    columns = list(CURVE_COLUMNS)
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, restval="")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(float(v)) if isinstance(v, float) or k in ("alpha", "loss", "acc") else v)
                    for k, v in r.items()})
    atomic_write(path, buf.getvalue())
    return path


def read_curves(run_dir: str | os.PathLike) -> list[dict]:
    """``curves.csv``'s rows: ``alpha``, ``loss``, ``acc`` as floats, other columns as written (strings).
    A truncated or corrupted file raises :class:`~lmc.errors.CorruptFile` naming it."""
    path = Path(run_dir) / "curves.csv"
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not set(CURVE_COLUMNS) <= set(reader.fieldnames):
                raise ValueError(f"its header lacks {', '.join(CURVE_COLUMNS)}")
            rows = []
            for line, r in enumerate(reader, start=2):
                if None in r or any(r[k] in (None, "") for k in ("method", "split", "alpha", "loss", "acc")):
                    raise ValueError(f"line {line} is incomplete")
                rows.append({**r, "alpha": float(r["alpha"]), "loss": float(r["loss"]), "acc": float(r["acc"])})
            return rows
    except FileNotFoundError:
        raise
    except (OSError, ValueError, csv.Error, UnicodeDecodeError) as exc:
        raise CorruptFile(f"{path} is truncated or corrupted ({exc})") from None
