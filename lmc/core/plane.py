"""Loss and accuracy on the plane through three models: the basin picture of the soups paper.

Following Garipov et al. (2018, ``timgaripov/dnn-mode-connectivity`` ``plane.py``) and the loss-landscape
figures of Wortsman et al. (2022), the plane through θ0, θ1, θ2 has origin θ0 and the orthonormal
directions

    û = (θ1 − θ0) / ‖θ1 − θ0‖,     v̂ = w / ‖w‖  with  w = (θ2 − θ0) − ⟨θ2 − θ0, û⟩·û,

so the models sit at (0, 0), (‖θ1 − θ0‖, 0) and (⟨θ2 − θ0, û⟩, ‖w‖), distances on the plane are distances
in weight space, and the point (a, b) is θ0 + a·û + b·v̂. The grid spans the models' coordinates plus a
margin on every side (a fraction of the span, 0.2 and 21 points per axis as in Garipov et al.); with
``include_models`` the models' own coordinates are added to the grid's axes, so three grid points are
exactly the three models. The vector is every floating-point entry of the state dict (``keys``),
integer buffers come from θ0; with ``bn_batches`` every point's BatchNorm statistics are recomputed
first (as ``utils.update_bn`` in Garipov et al.).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lmc.core.normalization import reset_bn_stats
from lmc.core.training import evaluate
from lmc.errors import ConfigError

__all__ = ["PlaneBasis", "PlaneGrid", "plane_basis", "plane_grid"]

StateDict = dict[str, torch.Tensor]
Splits = Mapping[str, tuple[torch.Tensor, torch.Tensor]]

COLLINEAR_TOL = 1e-9  # ‖w‖ / ‖θ2 − θ0‖ below this: the three models are (numerically) on one line


@dataclass
class PlaneBasis:
    """The plane through three models: origin θ0 and orthonormal directions ``u``, ``v`` (float64, on the
    merged ``keys``); ``coords`` (3, 2) are the models' own coordinates."""

    origin: Mapping[str, torch.Tensor]
    u: dict[str, torch.Tensor]
    v: dict[str, torch.Tensor]
    coords: np.ndarray

    def point(self, a: float, b: float) -> StateDict:
        """The state dict at plane coordinates (a, b): θ0 + a·û + b·v̂."""
        out = dict(self.origin)
        for k, u in self.u.items():
            base = self.origin[k]
            out[k] = (base.to(torch.float64) + a * u + b * self.v[k]).to(base.dtype)
        return out

    def project(self, sd: Mapping[str, torch.Tensor]) -> tuple[float, float]:
        """Coordinates of ``sd``'s projection onto the plane."""
        diffs = {k: sd[k].to(torch.float64) - self.origin[k].to(torch.float64) for k in self.u}
        return (sum((d * self.u[k]).sum() for k, d in diffs.items()).item(),
                sum((d * self.v[k]).sum() for k, d in diffs.items()).item())


def _dot(x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor]) -> float:
    return sum((x[k] * y[k]).sum() for k in x).item()


def plane_basis(
    sd0: Mapping[str, torch.Tensor],
    sd1: Mapping[str, torch.Tensor],
    sd2: Mapping[str, torch.Tensor],
    keys: Iterable[str] | None = None,
) -> PlaneBasis:
    """The plane with origin ``sd0``, first direction toward ``sd1`` and second toward ``sd2``
    (Gram–Schmidt); ``keys`` default to every floating-point entry."""
    keys = [k for k, v in sd0.items() if v.is_floating_point()] if keys is None else list(keys)
    for name, sd in (("θ1", sd1), ("θ2", sd2)):
        missing = [k for k in keys if k not in sd or sd[k].shape != sd0[k].shape]
        if missing:
            raise ConfigError(f"plane: {name} lacks entry {missing[0]} of θ0 (or its shape differs); "
                              "the three models must share one architecture")
    d1 = {k: sd1[k].to(torch.float64) - sd0[k].to(torch.float64) for k in keys}
    d2 = {k: sd2[k].to(torch.float64) - sd0[k].to(torch.float64) for k in keys}
    norm1 = _dot(d1, d1) ** 0.5
    norm2 = _dot(d2, d2) ** 0.5
    if norm1 == 0 or norm2 == 0:
        raise ConfigError("plane: θ1 or θ2 equals θ0; three distinct models are needed")
    u = {k: d / norm1 for k, d in d1.items()}
    a2 = _dot(d2, u)
    w = {k: d2[k] - a2 * u[k] for k in keys}
    b2 = _dot(w, w) ** 0.5
    if b2 <= COLLINEAR_TOL * norm2:
        raise ConfigError("plane: the three models lie on one line; the plane through them is undefined")
    v = {k: x / b2 for k, x in w.items()}
    coords = np.array([[0.0, 0.0], [norm1, 0.0], [a2, b2]])
    return PlaneBasis(sd0, u, v, coords)


@dataclass
class PlaneGrid:
    """Metrics on a rectilinear grid of the plane: ``a`` (columns) and ``b`` (rows) are the axes,
    ``loss[split]``/``acc[split]`` arrays of shape ``(len(b), len(a))``, ``model_coords`` (3, 2) the models'
    coordinates and ``model_index`` their ``(row, column)`` in the grid (when the axes include them)."""

    a: np.ndarray
    b: np.ndarray
    model_coords: np.ndarray
    loss: dict[str, np.ndarray]
    acc: dict[str, np.ndarray]
    model_index: list[tuple[int, int]] | None

    def rows(self) -> list[dict]:
        """The grid as a long table: one row per (split, a, b) with ``loss`` and ``acc``."""
        return [{"split": split, "a": float(a), "b": float(b), "loss": float(self.loss[split][i, j]),
                 "acc": float(self.acc[split][i, j])}
                for split in self.loss for i, b in enumerate(self.b) for j, a in enumerate(self.a)]


def _axis(values: Sequence[float], num_points: int, margin: float, include: bool) -> np.ndarray:
    lo, hi = min(values), max(values)
    span = hi - lo
    axis = np.linspace(lo - margin * span, hi + margin * span, num_points)
    if include:
        axis = np.unique(np.concatenate([axis, np.asarray(values, dtype=float)]))
    return axis


def plane_grid(
    model: nn.Module,
    sd0: Mapping[str, torch.Tensor],
    sd1: Mapping[str, torch.Tensor],
    sd2: Mapping[str, torch.Tensor],
    splits: Splits,
    num_points: int = 21,
    margin: float = 0.2,
    include_models: bool = True,
    bn_batches: Sequence[torch.Tensor] | None = None,
    keys: Iterable[str] | None = None,
    batch_size: int = 8192,
    progress: bool = False,
) -> PlaneGrid:
    """Loss and accuracy of ``model`` on every split of ``splits`` at every point of a ``num_points`` ×
    ``num_points`` grid over the plane through ``sd0``, ``sd1``, ``sd2`` (see the module docstring),
    ``margin`` times the models' span beyond them on each side; ``include_models`` adds the models'
    coordinates to the axes. ``bn_batches``: recompute BatchNorm statistics at each point on them."""
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
        raise ConfigError(f"plane num_points must be an integer of at least 2, got {num_points!r}")
    if not margin >= 0:
        raise ConfigError(f"plane margin must be non-negative, got {margin}")
    basis = plane_basis(sd0, sd1, sd2, keys)
    coords = basis.coords
    a_axis = _axis(coords[:, 0].tolist(), num_points, margin, include_models)
    b_axis = _axis(coords[:, 1].tolist(), num_points, margin, include_models)
    loss = {s: np.zeros((len(b_axis), len(a_axis))) for s in splits}
    acc = {s: np.zeros((len(b_axis), len(a_axis))) for s in splits}
    points = [(i, j) for i in range(len(b_axis)) for j in range(len(a_axis))]
    for i, j in tqdm(points, desc="plane", disable=not progress, leave=False):
        params = basis.point(float(a_axis[j]), float(b_axis[i]))
        if bn_batches is not None:
            params = reset_bn_stats(model, params, list(bn_batches))
        for split, (x, y) in splits.items():
            loss[split][i, j], acc[split][i, j] = evaluate(model, x, y, batch_size=batch_size, params=params)
    index = None
    if include_models:
        index = [(int(np.flatnonzero(b_axis == b)[0]), int(np.flatnonzero(a_axis == a)[0])) for a, b in coords]
    return PlaneGrid(a_axis, b_axis, coords, loss, acc, index)
