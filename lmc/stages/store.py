"""The run store: every trained model, alignment and interpolation curve, kept once and found by hash.

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
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any

from torch import nn

from lmc.core.data import Dataset
from lmc.core.training import TrainConfig, seeded_init, train
from lmc.errors import ConfigError, CorruptCheckpoint, StoreError
from lmc.io import CheckpointDir, atomic_write, load_verified, read_curves, save_atomic, write_curves

__all__ = ["ON_CORRUPT", "Store", "StoredModel", "model_settings", "settings_hash"]

ON_CORRUPT = ("error", "retrain")
NOT_DATA_IDENTITY = ("root", "download")  # where the data lives, not what it is
NOT_TRAIN_IDENTITY = ("checkpoint_every", "keep_checkpoints", "concurrent_pair", "compile")  # not the weights


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


def model_settings(
    data: Mapping,
    model: Mapping,
    train: Mapping,
    init_seed: int,
    data_seed: int,
    aug_seed: int,
    spawn: Mapping | None = None,
    data_part: int | None = None,
) -> dict:
    """The settings that determine a trained model's weights (its store identity). ``data_part`` is
    the model's part of a split training set (``data.split``), ``None`` when it trains on all of it."""
    settings = {
        "data": {k: v for k, v in data.items() if k not in NOT_DATA_IDENTITY},
        "model": dict(model),
        "train": {k: v for k, v in train.items() if k not in NOT_TRAIN_IDENTITY},
        "seeds": {"init": init_seed, "data": data_seed, "aug": aug_seed},
        "spawn": dict(spawn) if spawn else None,
    }
    if data_part is not None:
        settings["data_part"] = data_part
    return settings


@dataclass
class StoredModel:
    model: nn.Module
    hash: str
    path: Path  # the entry's folder
    reused: bool  # loaded from the store rather than trained by this call
    history: list[dict] = field(default_factory=list)
    final_state: dict | None = None  # full training state at the end (spawn parents: the children start here)


class Store:
    """Trained models, alignments and curves under ``root``, keyed by the hash of their settings."""

    def __init__(self, root: str | os.PathLike, on_corrupt: str = "error"):
        if on_corrupt not in ON_CORRUPT:
            raise ConfigError(f"unknown store.on_corrupt '{on_corrupt}'; valid: {', '.join(ON_CORRUPT)}")
        self.root = Path(root)
        self.on_corrupt = on_corrupt

    def check_writable(self) -> None:
        """Create the root if needed and prove it writable; StoreError naming the path otherwise."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise StoreError(f"store.root '{self.root}' is not writable ({exc.strerror or exc}); "
                             f"set store.root=<folder> or $LMC_STORE") from None

    def entry(self, kind: str, settings: Mapping) -> tuple[str, Path]:
        h = settings_hash(settings)
        return h, self.root / kind / h

    # ----------------------------------------------------------------------------------- models

    def trained_model(
        self,
        settings: Mapping,
        build: Callable[[], nn.Module],
        data: Dataset,
        train_cfg: TrainConfig,
        progress: bool | str = True,
        stop_step: int | None = None,
        start: Mapping | None = None,
    ) -> StoredModel:
        """The model of ``settings``: loaded when stored, else trained (resuming from its checkpoints).

        ``build()`` makes the architecture on the training device; the init seed, data-order seed and
        augmentation seed are ``settings['seeds']``. ``stop_step``/``start`` as in :func:`train`.
        """
        h, path = self.entry("models", settings)
        with self._lock(path):
            for attempt in range(2):
                try:
                    if (path / "meta.json").exists():
                        return self._load_model(settings, h, path, build)
                    return self._train_model(settings, h, path, build, data, train_cfg, progress, stop_step, start)
                except CorruptCheckpoint as exc:
                    if self.on_corrupt != "retrain" or attempt:
                        raise CorruptCheckpoint(f"{exc}; set store.on_corrupt=retrain to retrain it") from None
                    self._set_aside(path, exc)
        raise AssertionError("unreachable")

    def _load_model(self, settings, h, path, build) -> StoredModel:
        meta = self._read_meta(path)
        stored = load_verified(path / "model.pt", meta.get("sha256"))
        model = build()
        try:
            model.load_state_dict(stored["model"])
        except (KeyError, RuntimeError) as exc:
            raise CorruptCheckpoint(f"checkpoint {path / 'model.pt'} does not fit the model "
                                    f"({type(exc).__name__})") from None
        model.eval()
        return StoredModel(model, h, path, True, stored.get("history", []), stored.get("final_state"))

    def _train_model(self, settings, h, path, build, data, train_cfg, progress, stop_step, start) -> StoredModel:
        seeds = settings["seeds"]
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / "settings.json", json.dumps(settings, indent=2, default=str) + "\n")
        model = seeded_init(build, seeds["init"])
        checkpoints = CheckpointDir(path / "checkpoints")
        if checkpoints.latest_file() is not None:
            print(f"resuming {path} from {checkpoints.latest_file().name}", flush=True)
        t0 = time.perf_counter()
        history = train(model, data, train_cfg, data_seed=seeds["data"], aug_seed=seeds["aug"], progress=progress,
                        checkpoints=checkpoints, stop_step=stop_step, start=start)
        final = checkpoints.latest() if stop_step is not None else None
        stored = {"model": model.state_dict(), "history": history, "settings": settings, "final_state": final}
        sha = save_atomic(path / "model.pt", stored)
        meta = {"hash": h, "settings": settings, "sha256": sha, "history": history,
                "train_seconds": time.perf_counter() - t0, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write(path / "meta.json", json.dumps(meta, indent=2, default=str) + "\n")
        checkpoints.drop_latest()  # model.pt holds it now; kept checkpoints stay
        return StoredModel(model, h, path, False, history, final)

    @staticmethod
    def _read_meta(path: Path) -> dict:
        try:
            return json.loads((path / "meta.json").read_text())
        except (OSError, ValueError):
            raise CorruptCheckpoint(f"store entry {path / 'meta.json'} is corrupted") from None

    @staticmethod
    def _set_aside(path: Path, exc: Exception) -> None:
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        warnings.warn(f"{exc}; moved {path} to {aside} and retraining (store.on_corrupt=retrain)", stacklevel=3)
        shutil.move(str(path), str(aside))

    @contextlib.contextmanager
    def _lock(self, path: Path) -> Iterator[None]:
        """One process at a time trains a given model; the others wait, then load it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another process training {path} ...", flush=True)
                fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

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

    def alignment(self, settings: Mapping, compute: Callable[[], tuple[Any, dict]]) -> tuple[Any, str, bool]:
        """``(permutation, diagnostics)`` (``compute()``'s pair: a dict of index tensors and a dict of
        numbers) stored as ``alignments/<hash>/perm.pt``."""
        return self.cached("alignments", settings, compute,
                           lambda p, value: save_atomic(p / "perm.pt", dict(zip(("perm", "diagnostics"), value))),
                           lambda p: itemgetter("perm", "diagnostics")(load_verified(p / "perm.pt")))

    def curves(self, settings: Mapping, compute: Callable[[], list[dict]]) -> tuple[list[dict], str, bool]:
        """Curve rows stored as ``curves/<hash>/curves.csv``."""
        return self.cached("curves", settings, compute, write_curves, read_curves)
