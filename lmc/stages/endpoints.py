"""Trained models from the run store: loaded when stored, trained (resuming from checkpoints) otherwise.

A model's store identity (:func:`model_settings`) is exactly what determines its weights: the data
(its settings minus where it lives, plus the fingerprint of the arrays loaded), the architecture (class,
options, source fingerprint), the training recipe (minus checkpoint bookkeeping), its init / data-order /
augmentation seeds, and, where used, the spawn point or the part of a split training set.

Three ways studies get models, each a function over :func:`trained_model`:

- :func:`seed_models` — one model per seed triple, each on its own training data (the whole training
  set, or its part of ``data.split``), one after the other or at the same time;
- :func:`spawned_models` — one parent trains k steps, the children continue from its full training
  state with their own data-order / augmentation seeds (Frankle et al.'s instability analysis);
- :func:`trained_model` itself, for any other set-up a study builds (its ``settings`` and ``start``).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from torch import nn

from lmc.core.data import Dataset
from lmc.core.training import TrainConfig, check_thread_safe, concurrently, seeded_init, train
from lmc.errors import ConfigError, CorruptCheckpoint, StoreError
from lmc.io import CheckpointDir, atomic_write, load_verified, save_atomic
from lmc.stages.settings import DataSettings, ModelSettings
from lmc.stages.store import Store

__all__ = ["NOT_DATA_IDENTITY", "NOT_TRAIN_IDENTITY", "Recipe", "Seeds", "StoredModel", "check_spawn_step",
           "kept_states", "model_settings", "seed_models", "spawned_models", "trained_model"]

NOT_DATA_IDENTITY = ("root", "download")  # where the data lives, not what it is
NOT_TRAIN_IDENTITY = ("checkpoint_every", "keep_checkpoints", "concurrent_pair", "compile")  # not the weights


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


def trained_model(
    store: Store,
    settings: Mapping,
    build: Callable[[], nn.Module],
    data: Dataset,
    train_cfg: TrainConfig,
    progress: bool | str = True,
    stop_step: int | None = None,
    start: Mapping | None = None,
    fit: Callable[..., list[dict]] = train,
) -> StoredModel:
    """The model of ``settings``: loaded when stored, else trained (resuming from its checkpoints).

    ``build()`` makes the architecture on the training device; the init seed, data-order seed and
    augmentation seed are ``settings['seeds']``. ``stop_step``/``start`` as in :func:`lmc.core.training.train`.
    ``fit`` trains the freshly initialised model in place with :func:`~lmc.core.training.train`'s
    arguments and returns its history: ``train`` itself by default; a study passes its own (fine-tuning
    from a parent's weights, a star model's loop, a planted initialisation…) and puts whatever
    determines it into ``settings``. One process at a time trains a given model (the store's lock); a
    corrupted stored checkpoint stops with its path, or with ``store.on_corrupt=retrain`` is set aside
    and trained again.
    """
    h, path = store.entry("models", settings)
    with store.lock(path):
        for attempt in range(2):
            try:
                if (path / "meta.json").exists():
                    return _load(store, h, path, build)
                return _train(h, path, settings, build, data, train_cfg, progress, stop_step, start, fit)
            except CorruptCheckpoint as exc:
                if store.on_corrupt != "retrain" or attempt:
                    raise CorruptCheckpoint(f"{exc}; set store.on_corrupt=retrain to retrain it") from None
                store.set_aside(path, exc)
    raise AssertionError("unreachable")


def _load(store: Store, h: str, path: Path, build: Callable[[], nn.Module]) -> StoredModel:
    meta = store.read_meta(path)
    stored = load_verified(path / "model.pt", meta.get("sha256"))
    model = build()
    try:
        model.load_state_dict(stored["model"])
    except (KeyError, RuntimeError) as exc:
        raise CorruptCheckpoint(f"checkpoint {path / 'model.pt'} does not fit the model "
                                f"({type(exc).__name__})") from None
    model.eval()
    return StoredModel(model, h, path, True, stored.get("history", []), stored.get("final_state"))


def _train(h, path, settings, build, data, train_cfg, progress, stop_step, start, fit) -> StoredModel:
    seeds = settings["seeds"]
    model = seeded_init(build, seeds["init"])  # built before the entry's folder exists: a failing build leaves none
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / "settings.json", json.dumps(settings, indent=2, default=str) + "\n")
    checkpoints = CheckpointDir(path / "checkpoints")
    if checkpoints.latest_file() is not None:
        print(f"resuming {path} from {checkpoints.latest_file().name}", flush=True)
    t0 = time.perf_counter()
    history = fit(model, data, train_cfg, data_seed=seeds["data"], aug_seed=seeds["aug"], progress=progress,
                  checkpoints=checkpoints, stop_step=stop_step, start=start)
    final = checkpoints.latest() if stop_step is not None else None
    stored = {"model": model.state_dict(), "history": history, "settings": settings, "final_state": final}
    sha = save_atomic(path / "model.pt", stored)
    meta = {"hash": h, "settings": settings, "sha256": sha, "history": history,
            "train_seconds": time.perf_counter() - t0, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write(path / "meta.json", json.dumps(meta, indent=2, default=str) + "\n")
    checkpoints.drop_latest()  # model.pt holds it now; kept checkpoints stay
    return StoredModel(model, h, path, False, history, final)


def kept_states(
    store: Store,
    stored: StoredModel,
    settings: Mapping,
    build: Callable[[], nn.Module],
    data: Dataset,
    train_cfg: TrainConfig,
    keep: Sequence[int | str],
    progress: bool | str = False,
    stop_step: int | None = None,
    start: Mapping | None = None,
    fit: Callable[..., list[dict]] = train,
) -> dict[int, dict]:
    """The model's training states at the kept points ``keep`` (epochs ``3``/``"3ep"`` or steps ``"100st"``,
    as ``train.keep_checkpoints``), by optimiser step: ``{step: state}`` (``state["model"]`` the weights).

    Kept checkpoints are bookkeeping, not part of a model's identity, so a stored model may lack some.
    Then its training is replayed from its seeds with those points kept, and the replay is accepted only
    if it ends in exactly the stored weights (training is deterministic on one machine and thread count);
    the kept checkpoints join the entry for every later call. Otherwise StoreError: the entry was trained
    elsewhere and its history cannot be reproduced here.
    """
    steps_per_epoch = math.ceil(len(data.y_train) / train_cfg.batch_size)
    cfg = replace(train_cfg, keep_checkpoints=list(keep))
    wanted = cfg.keep_steps(steps_per_epoch)
    checkpoints = CheckpointDir(stored.path / "checkpoints")
    if not wanted <= set(checkpoints.kept()):
        with store.lock(stored.path):
            replay = CheckpointDir(stored.path / "replay")
            model = seeded_init(build, settings["seeds"]["init"])
            fit(model, data, cfg, data_seed=settings["seeds"]["data"], aug_seed=settings["seeds"]["aug"],
                progress=progress, checkpoints=replay, stop_step=stop_step, start=start)
            final = stored.model.state_dict()
            if any(not torch.equal(v, final[k].to(v.device)) for k, v in model.state_dict().items()):
                shutil.rmtree(replay.path, ignore_errors=True)
                raise StoreError(f"stored model {stored.path} lacks the checkpoints {sorted(wanted)} and replaying its "
                                 "training here does not reproduce its weights (trained on another machine or "
                                 "thread count?); remove the entry to retrain it with train.keep_checkpoints")
            checkpoints.adopt(replay, wanted)
            shutil.rmtree(replay.path, ignore_errors=True)
    kept = checkpoints.kept()
    return {step: load_verified(*kept[step]) for step in sorted(wanted)}


@dataclass(frozen=True)
class Seeds:
    """The three independent random streams of one trained model."""

    init: int  # the initial weights
    data: int  # the order of training examples
    aug: int  # augmentation (and any other randomness in the training step)


@dataclass
class Recipe:
    """What the models of a study share: the data, the architecture and the training recipe."""

    data: DataSettings
    dataset: Dataset  # loaded (its fingerprint is part of every model's identity)
    model: ModelSettings
    train: TrainConfig
    device: torch.device

    def build(self) -> nn.Module:
        return self.model.build(self.dataset.input_shape, self.dataset.num_classes).to(self.device)

    def settings(self, seeds: Seeds, spawn: Mapping | None = None, data_part: int | None = None) -> dict:
        return model_settings(self.data.identity(self.dataset.fingerprint), self.model.identity(), asdict(self.train),
                              seeds.init, seeds.data, seeds.aug, spawn, data_part)

    def check(self) -> None:
        """Build the architecture once (before anything is trained or stored): a bad option or an input
        shape the model cannot take is a ConfigError now; with ``train.concurrent_pair`` a model with
        dropout is refused."""
        model = self.model.build(self.dataset.input_shape, self.dataset.num_classes)
        if self.train.concurrent_pair:
            check_thread_safe(model, self.model.name)


def seed_models(
    store: Store,
    recipe: Recipe,
    seeds: Sequence[Seeds],
    parts: Sequence[Dataset] | None = None,
    tags: Sequence[str] | None = None,
    progress: bool = True,
) -> list[StoredModel]:
    """One model per ``seeds`` entry; model ``i`` trains on ``parts[i]`` (its part of a split training set;
    default: all of it, recorded in its identity as ``data_part=i`` when given). With
    ``train.concurrent_pair`` they train at the same time (one thread and CUDA stream each)."""
    tags = tags or [str(i) for i in range(len(seeds))]

    def get(i: int, s: Seeds) -> StoredModel:
        return trained_model(store, recipe.settings(s, data_part=None if parts is None else i), recipe.build,
                             recipe.dataset if parts is None else parts[i], recipe.train,
                             progress=progress and f"train {tags[i]} (seed {s.init})")

    jobs = [partial(get, i, s) for i, s in enumerate(seeds)]
    return concurrently(jobs, recipe.train.concurrent_pair, recipe.device)


def check_spawn_step(step: int, train_rows: int, train: TrainConfig, whose: str = "") -> None:
    """A one-line ConfigError unless ``0 <= step <=`` the training run's optimiser steps (``train.epochs`` ×
    steps per epoch over ``train_rows`` examples); ``whose`` names whose steps per epoch they are."""
    total = math.ceil(train_rows / train.batch_size) * train.epochs
    if not 0 <= step <= total:
        raise ConfigError(f"spawn.step must be an integer step in [0, {total}] (train.epochs × {whose}steps per "
                          f"epoch) or null, got {step}")


def spawned_models(
    store: Store,
    recipe: Recipe,
    parent_seeds: Seeds,
    child_seeds: Sequence[Seeds],
    step: int,
    tags: Sequence[str] | None = None,
    progress: bool = True,
) -> tuple[list[StoredModel], StoredModel]:
    """The children and their parent: the parent (``parent_seeds``) trains ``step`` optimiser steps and
    is stored with its full training state; each child continues from it with its own data-order and
    augmentation seeds (its init seed is the parent's)."""
    tags = tags or [str(i) for i in range(len(child_seeds))]
    parent = trained_model(store, recipe.settings(parent_seeds, spawn={"stop_step": step}), recipe.build,
                           recipe.dataset, recipe.train, stop_step=step,
                           progress=progress and f"train parent (seed {parent_seeds.init})")

    def child(i: int, s: Seeds) -> StoredModel:
        return trained_model(store, recipe.settings(s, spawn={"step": step, "parent": parent.hash}), recipe.build,
                             recipe.dataset, recipe.train, progress=progress and f"train {tags[i]} (seed {s.init})",
                             start=parent.final_state)

    jobs = [partial(child, i, s) for i, s in enumerate(child_seeds)]
    return concurrently(jobs, recipe.train.concurrent_pair, recipe.device), parent
