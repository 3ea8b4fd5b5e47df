"""The run store: every trained model, alignment and set of curves, kept once and found by hash.

A stored object lives in ``<root>/<kind>/<hash>/`` where ``hash`` is the first 16 hex digits of the
sha256 of the canonical JSON of exactly the settings that determine it (as open_lth names runs):

- ``models/<hash>/``: data (minus its folder), model, training recipe (minus checkpoint bookkeeping),
  the init / data-order / augmentation seeds and the spawn point. ``model.pt`` (weights, history),
  ``meta.json`` (the settings, the file's sha256; written last: the entry is complete when it exists)
  and ``checkpoints/`` (training checkpoints, resumed after a crash; kept ones stay).
- ``alignments/<hash>/perm.pt``: the method's settings plus both models' hashes.
- ``curves/<hash>/curves.csv``: the interpolation settings, the method, the models' and the
  alignment's hashes.

Logging, device, progress bars and the store's own settings are not part of any hash. A run that
needs an object the store holds loads it instead of computing it; writes are atomic, and a model is
trained by one process at a time (a lock file), so concurrent jobs of a sweep share the work.

This module is the store itself (entries, locks, derived results); what goes into each kind of entry
is the stages' business (:mod:`lmc.stages.endpoints`, :mod:`lmc.stages.alignment`, :mod:`lmc.stages.curves`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from lmc.errors import ConfigError, CorruptCheckpoint, StoreError
from lmc.io import atomic_write

__all__ = ["ON_CORRUPT", "Store", "settings_hash"]

ON_CORRUPT = ("error", "retrain")


def settings_hash(settings: Mapping) -> str:
    """First 16 hex digits of the sha256 of ``settings`` as canonical JSON (sorted keys; integral floats
    written as integers, so ``warmup_epochs=0`` and ``0.0`` are the same run)."""
    canonical = json.dumps(_canonical(settings), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _canonical(value):
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class Store:
    """Trained models, alignments and curves under ``root``, keyed by the hash of their settings."""

    def __init__(self, root: str | os.PathLike, on_corrupt: str = "error"):
        if on_corrupt not in ON_CORRUPT:
            raise ConfigError(f"unknown store.on_corrupt '{on_corrupt}'; valid: {', '.join(ON_CORRUPT)}")
        self.root = Path(root)
        self.on_corrupt = on_corrupt

    def check_writable(self) -> None:
        """Prove the root writable (StoreError naming the path otherwise) without leaving anything behind:
        folders this check had to create are removed again, so a run that fails before its first entry
        leaves no trace in the store."""
        created = [p for p in (self.root, *self.root.parents) if not p.exists()]
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise StoreError(f"store.root '{self.root}' is not writable ({exc.strerror or exc}); "
                             f"set store.root=<folder> or $LMC_STORE") from None
        finally:
            for folder in created:  # innermost first
                with contextlib.suppress(OSError):
                    folder.rmdir()

    def entry(self, kind: str, settings: Mapping) -> tuple[str, Path]:
        h = settings_hash(settings)
        return h, self.root / kind / h

    @staticmethod
    def read_meta(path: Path) -> dict:
        try:
            return json.loads((path / "meta.json").read_text())
        except (OSError, ValueError):
            raise CorruptCheckpoint(f"store entry {path / 'meta.json'} is corrupted") from None

    @staticmethod
    def set_aside(path: Path, exc: Exception) -> None:
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        warnings.warn(f"{exc}; moved {path} to {aside} and retraining (store.on_corrupt=retrain)", stacklevel=3)
        shutil.move(str(path), str(aside))

    @contextlib.contextmanager
    def lock(self, path: Path) -> Iterator[None]:
        """One process at a time computes a given entry (trains a model); the others wait, then load it.

        The lock is an ``flock`` on ``.<hash>.lock`` beside the entry, which the kernel releases when its
        holder dies, so a killed run never blocks a later one. The holder removes the file when it is
        done (nothing is left behind); a waiter that then wakes holding the removed file's lock sees
        that the path no longer names its file, and locks the path afresh."""
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = path.parent / f".{path.name}.lock"
        waiting = False
        while True:
            f = open(lock_path, "a")
            try:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if not waiting:
                        print(f"waiting for another process computing {path} ...", flush=True)
                        waiting = True
                    fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    current = os.stat(lock_path)
                except FileNotFoundError:
                    current = None
                held = os.fstat(f.fileno())
                if current is None or (current.st_dev, current.st_ino) != (held.st_dev, held.st_ino):
                    continue  # the holder before us removed it: lock the path's new file
                try:
                    yield
                finally:
                    with contextlib.suppress(OSError):
                        lock_path.unlink()  # while still holding it: waiters on it will retry
                return
            finally:
                f.close()

    # ------------------------------------------------------------------------ analysis results

    def cached(
        self,
        kind: str,
        settings: Mapping,
        compute: Callable[[], Any],
        write: Callable[[Path, Any], None],
        read: Callable[[Path], Any],
    ) -> tuple[Any, str, bool]:
        """``(value, hash, reused)``: ``read(folder)`` if the entry is complete, else ``compute()`` and
        ``write(folder, value)`` it. A broken entry is recomputed with a warning (it is derived data)."""
        h, path = self.entry(kind, settings)
        if (path / "meta.json").exists():
            try:
                return read(path), h, True
            except Exception as exc:  # noqa: BLE001 - a broken derived result is recomputed
                warnings.warn(f"store entry {path} is unreadable ({type(exc).__name__}); recomputing", stacklevel=2)
        value = compute()
        path.mkdir(parents=True, exist_ok=True)
        write(path, value)
        atomic_write(path / "meta.json", json.dumps({"hash": h, "settings": settings}, indent=2, default=str) + "\n")
        return value, h, False
