"""Loss and error barriers: pure functions of curves.

For a metric ``M`` (loss, or error = 1 − accuracy) evaluated along ``θ_α``:

* ``barrier`` (default; Entezari et al. 2022, Git Re-Basin):
  ``max_α M(θ_α) − [(1 − α)·M(θ_A) + α·M(θ_B)]``;
* ``midpoint``: ``M(θ_0.5) − [M(θ_A) + M(θ_B)] / 2`` (``M(θ_0.5)`` read off the curve, linearly
  interpolated between grid points if 0.5 is not on the α grid);
* ``frankle`` (Frankle et al. 2020): ``max_α M(θ_α) − [M(θ_A) + M(θ_B)] / 2``.

The endpoint values default to the curve's values at α = 0 and α = 1. Layer-wise curves interpolate
one layer only, so their α = 1 end is not model B: pass the whole-model endpoints explicitly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

__all__ = [
    "barrier",
    "midpoint_barrier",
    "frankle_barrier",
    "curve",
    "barriers_from_curves",
    "layerwise_barriers",
]


def _check(alphas, values):
    alphas = np.asarray(alphas, dtype=float)
    values = np.asarray(values, dtype=float)
    if alphas.shape != values.shape or alphas.ndim != 1 or len(alphas) < 2:
        raise ValueError(f"need matching 1-D α and value arrays of length ≥ 2, got {alphas.shape}, {values.shape}")
    order = np.argsort(alphas)
    return alphas[order], values[order]


def _ends(alphas, values, value_a, value_b):
    if value_a is None:
        if not np.isclose(alphas[0], 0.0):
            raise ValueError("curve does not start at α = 0; pass value_a")
        value_a = values[0]
    if value_b is None:
        if not np.isclose(alphas[-1], 1.0):
            raise ValueError("curve does not end at α = 1; pass value_b")
        value_b = values[-1]
    return float(value_a), float(value_b)


def barrier(alphas, values, value_a: float | None = None, value_b: float | None = None) -> float:
    """``max_α M(θ_α) − [(1 − α)·M_A + α·M_B]``."""
    alphas, values = _check(alphas, values)
    va, vb = _ends(alphas, values, value_a, value_b)
    return float(np.max(values - ((1 - alphas) * va + alphas * vb)))


def midpoint_barrier(alphas, values, value_a: float | None = None, value_b: float | None = None) -> float:
    """``M(θ_0.5) − (M_A + M_B) / 2``."""
    alphas, values = _check(alphas, values)
    va, vb = _ends(alphas, values, value_a, value_b)
    return float(np.interp(0.5, alphas, values) - 0.5 * (va + vb))


def frankle_barrier(alphas, values, value_a: float | None = None, value_b: float | None = None) -> float:
    """``max_α M(θ_α) − (M_A + M_B) / 2``."""
    alphas, values = _check(alphas, values)
    va, vb = _ends(alphas, values, value_a, value_b)
    return float(np.max(values) - 0.5 * (va + vb))


_VARIANTS = {"": barrier, "_midpoint": midpoint_barrier, "_frankle": frankle_barrier}


def curve(rows: Iterable[Mapping], method: str, split: str, layer: str = "") -> dict[str, np.ndarray]:
    """Arrays ``alpha``, ``loss``, ``acc``, ``error`` of one curve, sorted by α."""
    sel = sorted(
        (r for r in rows if r["method"] == method and r["split"] == split and (r["layer"] or "") == layer),
        key=lambda r: float(r["alpha"]),
    )
    if not sel:
        raise KeyError(f"no curve for method={method!r} split={split!r} layer={layer!r}")
    out = {k: np.array([float(r[k]) for r in sel]) for k in ("alpha", "loss", "acc")}
    out["error"] = 1.0 - out["acc"]
    return out


def _keys(rows, field, **match) -> list[str]:
    seen = []
    for r in rows:
        if all((r[k] or "") == v for k, v in match.items()) and r[field] not in seen:
            seen.append(r[field])
    return seen


def barriers_from_curves(rows: list[Mapping]) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {split: {loss, error, loss_midpoint, error_midpoint, loss_frankle, error_frankle}}}``
    for the whole-model curves (``layer`` empty)."""
    whole = [r for r in rows if not r["layer"]]
    out: dict = {}
    for method in _keys(whole, "method"):
        out[method] = {}
        for split in _keys(whole, "split", method=method):
            c = curve(whole, method, split)
            out[method][split] = {
                f"{metric}{suffix}": fn(c["alpha"], c[metric])
                for suffix, fn in _VARIANTS.items()
                for metric in ("loss", "error")
            }
    return out


def layerwise_barriers(
    rows: list[Mapping], endpoints: Mapping[str, Mapping[str, Mapping[str, float]]]
) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """``{method: {layer: {split: {loss, error}}}}`` from layer-wise curves, with the baseline the
    linear interpolation of the full endpoints ``endpoints[a|b][split][loss|acc]``."""
    layered = [r for r in rows if r["layer"]]
    out: dict = {}
    for method in _keys(layered, "method"):
        out[method] = {}
        for layer in _keys(layered, "layer", method=method):
            out[method][layer] = {}
            for split in _keys(layered, "split", method=method, layer=layer):
                c = curve(layered, method, split, layer)
                ea, eb = endpoints["a"][split], endpoints["b"][split]
                out[method][layer][split] = {
                    "loss": barrier(c["alpha"], c["loss"], ea["loss"], eb["loss"]),
                    "error": barrier(c["alpha"], c["error"], 1 - ea["acc"], 1 - eb["acc"]),
                }
    return out
