"""The merging stages: children fine-tuned from a parent, and what merging computes once per model, through
the run store.

- :func:`fine_tuned_model`: a child trained from its parent's weights with a fresh optimiser and its own
  recipe (:func:`~lmc.stages.endpoints.trained_model` with the :func:`finetune_from` hook); its identity is
  the caller's ``settings``, which hold the parent's hash and the child's own recipe and seeds.
- :func:`stored_statistics`: a model's Fisher diagonal or RegMean Gram matrices
  (:func:`lmc.core.merging.fisher_diagonal`, :func:`~lmc.core.merging.gram_matrices`), stored under
  ``fisher/<hash>/`` or ``gram/<hash>/`` and keyed by the model's hash, the permutation applied to it and
  the batches they were computed on, so a second run or another merge reuses them.
- :func:`stored_plane`: the loss/accuracy grid on the plane through three models
  (:func:`lmc.core.plane.plane_grid`), under ``planes/<hash>/``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from functools import partial

import numpy as np
import torch
from torch import nn

from lmc.core.data import Dataset
from lmc.core.permutation import Permutation
from lmc.core.plane import PlaneGrid
from lmc.core.training import TrainConfig, train
from lmc.io import load_verified, save_atomic
from lmc.stages.endpoints import StoredModel, trained_model
from lmc.stages.store import Store

__all__ = ["finetune_from", "fine_tuned_model", "permutation_digest", "stored_plane", "stored_statistics"]


def _finetune(parent_state: Mapping[str, torch.Tensor], model: nn.Module, data: Dataset, cfg: TrainConfig,
              **kwargs) -> list[dict]:
    model.load_state_dict(parent_state)
    return train(model, data, cfg, **kwargs)


def finetune_from(parent_state: Mapping[str, torch.Tensor]) -> Callable[..., list[dict]]:
    """A ``fit`` hook for :func:`~lmc.stages.endpoints.trained_model`: load ``parent_state`` into the freshly
    built model, then :func:`~lmc.core.training.train` it (a new optimiser and schedule; a killed run resumes
    from its own checkpoints, which replace the parent's weights)."""
    return partial(_finetune, parent_state)


def fine_tuned_model(
    store: Store,
    settings: Mapping,
    build: Callable[[], nn.Module],
    parent: StoredModel,
    data: Dataset,
    cfg: TrainConfig,
    progress: bool | str = True,
) -> StoredModel:
    """The child of ``settings`` (which must hold ``parent.hash``), fine-tuned from ``parent``'s weights on
    ``data`` by ``cfg``: loaded when stored, trained once otherwise."""
    if settings.get("parent") != parent.hash:
        raise ValueError("a fine-tuned model's settings must hold its parent's hash under 'parent'")
    return trained_model(store, settings, build, data, cfg, progress=progress,
                         fit=finetune_from(parent.model.state_dict()))


def permutation_digest(perm: Permutation | None) -> str | None:
    """A short sha256 of a permutation's groups and indices (``None`` for no permutation): part of the key of
    statistics computed on a permuted model."""
    if perm is None:
        return None
    digest = hashlib.sha256()
    for group in sorted(perm):
        digest.update(str(group).encode())
        digest.update(np.ascontiguousarray(perm[group].cpu().numpy(), dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def stored_statistics(
    store: Store,
    kind: str,
    key: Mapping,
    compute: Callable[[], dict[str, torch.Tensor]],
) -> tuple[dict[str, torch.Tensor], str, bool]:
    """``(statistics, hash, reused)``: a model's ``kind`` statistics (``fisher`` or ``gram``: a dict of
    tensors) keyed by ``key`` (the model's hash, its permutation's digest, the batches), from the store or
    computed and stored."""
    return store.cached(kind, dict(key), compute,
                        lambda path, value: save_atomic(path / "stats.pt", dict(value)),
                        lambda path: load_verified(path / "stats.pt"))


def stored_plane(store: Store, key: Mapping, compute: Callable[[], PlaneGrid]) -> tuple[PlaneGrid, str, bool]:
    """``(grid, hash, reused)`` of the plane through three models, keyed by ``key`` (their hashes, the grid's
    size and margin, the split and the BatchNorm correction)."""

    def write(path, grid: PlaneGrid) -> None:
        save_atomic(path / "plane.pt", {"a": grid.a, "b": grid.b, "model_coords": grid.model_coords,
                                        "loss": grid.loss, "acc": grid.acc, "model_index": grid.model_index})

    def read(path) -> PlaneGrid:
        stored = load_verified(path / "plane.pt")
        return PlaneGrid(np.asarray(stored["a"]), np.asarray(stored["b"]), np.asarray(stored["model_coords"]),
                         dict(stored["loss"]), dict(stored["acc"]), stored["model_index"])

    return store.cached("planes", dict(key), compute, write, read)
