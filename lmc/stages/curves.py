"""The curves stage: metrics along the linear path from A to B (whole model, and layer-wise), through
the store.

Stored under ``curves/<hash>/curves.csv``, keyed by the interpolation settings, the method label and
the hashes of both models and of the alignment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict

import torch
from torch import nn

from lmc.core.interpolation import layerwise_sweep, sweep
from lmc.core.normalization import corrections, stat_batches
from lmc.io import read_curves, write_curves
from lmc.stages.settings import InterpSettings
from lmc.stages.store import Store

__all__ = ["interpolation_curves", "stored_curves"]


def interpolation_curves(
    interp: InterpSettings,
    model: nn.Module,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    alphas: Sequence[float],
    splits: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    method: str,
    layers: Mapping[str, Sequence[str]],
    x_train: torch.Tensor,
    norm: Mapping[str, bool],
    progress: bool = False,
) -> list[dict]:
    """Whole-model (and, with ``interp.layerwise``, layer-wise) curves from ``sd_a`` to ``sd_b``, each α
    corrected by BatchNorm reset and/or REPAIR (``norm``); the corrections add a suffix to ``method``."""
    batches = (stat_batches(x_train, interp.stat_batches, interp.stat_batch_size, interp.stat_seed)
               if any(norm.values()) else [])
    correct, suffix = corrections(model, sd_a, sd_b, batches, **norm)
    rows = sweep(model, sd_a, sd_b, alphas, splits, method + suffix, progress=progress, correct=correct,
                 batch_size=interp.eval_batch_size)
    if interp.layerwise:  # one layer moves: BatchNorm reset only (REPAIR targets whole-model α)
        correct, suffix = corrections(model, sd_a, sd_b, batches, norm["reset_bn"], repair=False)
        rows += layerwise_sweep(model, sd_a, sd_b, alphas, splits, method + suffix, layers, progress=progress,
                                correct=correct, batch_size=interp.eval_batch_size)
    return rows


def stored_curves(store: Store, interp: InterpSettings, method: str, hashes: Mapping[str, str | None],
                  compute) -> tuple[list[dict], str, bool]:
    """``(rows, hash, reused)`` of the curves ``compute()`` makes, keyed by the interpolation settings,
    ``method`` and ``hashes`` (``a``, ``b`` and ``alignment``)."""
    key = {"interp": asdict(interp), "method": method, **hashes}
    return store.cached("curves", key, compute, write_curves, read_curves)
