"""Linear interpolation between two models' weights, swept over α.

``θ_α = (1 − α)·θ_A + α·θ_B`` for every floating-point entry of the state dict; integer buffers
(e.g. BatchNorm's ``num_batches_tracked``) are taken from A. Layer-wise interpolation (Adilova et
al.) moves only one layer's entries and keeps every other entry at A.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lmc.core.barriers import barriers_from_curves
from lmc.core.training import evaluate
from lmc.errors import ConfigError

__all__ = ["alpha_grid", "layerwise_sweep", "lerp_state", "pairwise_barriers", "sweep"]

Splits = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def alpha_grid(num_alphas: int) -> np.ndarray:
    if num_alphas < 2:
        raise ConfigError(f"interp.num_alphas must be at least 2 (α = 0 and 1), got {num_alphas}")
    return np.linspace(0.0, 1.0, num_alphas)


def lerp_state(
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    alpha: float,
    keys: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """``(1 − α)·A + α·B`` on ``keys`` (default: all floating-point entries); A elsewhere."""
    keys = set(sd_a) if keys is None else set(keys)
    out = {}
    for k, a in sd_a.items():
        if k in keys and a.is_floating_point():
            out[k] = torch.lerp(a, sd_b[k].to(a.device, a.dtype), float(alpha))
        else:
            out[k] = a
    return out


def sweep(
    model: nn.Module,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    alphas: Sequence[float],
    splits: Splits,
    method: str,
    layer: str = "",
    keys: Iterable[str] | None = None,
    progress: bool = False,
    correct: Callable[[float, dict], dict] | None = None,
    batch_size: int = 8192,
) -> list[dict]:
    """Evaluate ``θ_α`` at every α on every split: rows ``method, layer, split, alpha, loss, acc``.
    ``correct(α, θ_α) -> θ_α'`` (e.g. BatchNorm reset or REPAIR, :mod:`lmc.normalization`) is applied
    to each interpolated state dict before it is evaluated."""
    keys = None if keys is None else list(keys)
    rows = []
    for alpha in tqdm(alphas, desc=f"α sweep {method} {layer}".strip(), disable=not progress, leave=False):
        params = lerp_state(sd_a, sd_b, alpha, keys)
        if correct is not None:
            params = correct(float(alpha), params)
        for split, (x, y) in splits.items():
            loss, acc = evaluate(model, x, y, batch_size=batch_size, params=params)
            rows.append({"method": method, "layer": layer, "split": split, "alpha": float(alpha),
                         "loss": loss, "acc": acc})
    return rows


def layerwise_sweep(
    model: nn.Module,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    alphas: Sequence[float],
    splits: Splits,
    method: str,
    layers: Mapping[str, Sequence[str]],
    progress: bool = False,
    correct: Callable[[float, dict], dict] | None = None,
    batch_size: int = 8192,
) -> list[dict]:
    """One :func:`sweep` per layer, interpolating only that layer's entries (weight and bias
    together) while every other entry stays at A."""
    rows = []
    for layer, keys in tqdm(layers.items(), desc=f"layer-wise {method}", disable=not progress, leave=False):
        rows += sweep(model, sd_a, sd_b, alphas, splits, method, layer=layer, keys=keys, correct=correct,
                      batch_size=batch_size)
    return rows


def pairwise_barriers(
    model: nn.Module,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    alphas: Sequence[float],
    splits: dict,
    names: Sequence[str] | None = None,
    **sweep_options,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{"i-j": {split: barriers}}`` of the linear path between every two of ``state_dicts``
    (``sweep_options``, e.g. ``batch_size``, go to :func:`lmc.interpolation.sweep`)."""
    names = list(names or range(len(state_dicts)))
    out = {}
    for i in range(len(state_dicts)):
        for j in range(i + 1, len(state_dicts)):
            rows = sweep(model, state_dicts[i], state_dicts[j], alphas, splits, "pair", **sweep_options)
            out[f"{names[i]}-{names[j]}"] = barriers_from_curves(rows)["pair"]
    return out
