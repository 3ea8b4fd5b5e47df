"""Dropout stability and the piecewise-linear path between two dropout-stable networks (Shevchenko &
Mondelli, "Landscape connectivity and dropout stability of SGD solutions for over-parameterized neural
networks", ICML 2020; the construction of Kuditipudi et al., NeurIPS 2019).

A network is dropout stable when removing part of the units of each hidden layer and rescaling the
remaining ones changes its loss little. Here a hidden layer's units are a permutation group of the
model's :class:`~lmc.core.permutation.PermutationSpec` (MLP units, CNN channels): keeping a fraction
``p`` of them (``k = round(p·n)`` units, a seeded random subset) zeroes the outgoing weights of the
others — every weight axis that reads the group as input — and multiplies the kept units' outgoing
weights by ``n / k`` (``1/p``), which is the mean-field network of ``k`` units. A unit's own entries
(its incoming weights, bias, normalisation parameters) are left alone. Groups merged by a residual
connection (one stream written by several layers) are refused: dropping a unit there is not this
operation.

The path between A and B (:func:`dropout_path`) picks, per hidden layer, a random half ``S`` of the units
that A keeps; B keeps the other half ``T``. Its corners:

1. ``A``;
2. ``A½``: A with ``T`` dropped, ``S`` rescaled (A's dropout network);
3. ``A½`` with every unit of ``T`` given B's incoming weights of ``B½`` (B's kept network, which reads
   only ``T``): ``T`` was dead in ``A½`` (nothing reads it), so the output does not change;
4. the output layer switched from reading A's kept units to reading B's: the two kept networks run side
   by side and do not read each other, so along this segment the logits are ``(1 − t)·A½(x) + t·B½(x)``;
5. ``B½``: the units of ``S``, now dead, take B's own weights (output unchanged);
6. ``B``.

Segments 3→4 and (for one hidden layer) 1→2 and 5→6 are linear in the logits, so with a loss convex in
the logits (cross-entropy) the loss along them stays below the larger of their end points; 2→3 and 4→5
leave the function unchanged. For one hidden layer this is the paper's bound: the path's loss exceeds
the end points' by at most their dropout instability. With several hidden layers, 1→2 and 5→6 rescale
several layers at once and are only straight lines, without that guarantee.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lmc.core.barriers import barrier
from lmc.core.interpolation import Splits, sweep
from lmc.core.permutation.spec import PermutationSpec
from lmc.core.training import evaluate
from lmc.errors import ConfigError

__all__ = [
    "DropoutStability",
    "compare_paths",
    "drop_units",
    "dropout_path",
    "dropout_stability",
    "hidden_groups",
    "random_kept",
]

StateDict = dict[str, torch.Tensor]


def hidden_groups(spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The spec's groups that are hidden layers of units: each written by exactly one weight (its
    producer's output axis). ConfigError naming a group written by several (a residual stream)."""
    for g, refs in spec.perm_to_axes.items():
        producers = [r.key for r in refs if r.axis == 0 and state_dict[r.key].dim() >= 2]
        if len(producers) != 1:
            raise ConfigError(f"dropout needs each hidden unit made by one layer; group {g} is written by "
                              f"{len(producers)} weights ({', '.join(producers) or 'none'}), as in a residual "
                              "stream; valid: models without residual connections (mlp, vgg, cnn1d)")
    return spec.groups


def random_kept(spec: PermutationSpec, p: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Per group, a boolean mask keeping ``max(1, round(p·n))`` of its ``n`` units, drawn from ``generator``."""
    if not 0 < p <= 1:
        raise ConfigError(f"dropout keep fraction p must be in (0, 1], got {p}")
    kept = {}
    for g, n in spec.sizes.items():
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.randperm(n, generator=generator)[: max(1, round(p * n))]] = True
        kept[g] = mask
    return kept


def _outgoing(spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor], group: str):
    """The (key, axis, block) of every weight axis that reads ``group`` as its input."""
    return [(r.key, r.axis, r.block) for r in spec.perm_to_axes[group]
            if r.axis >= 1 and state_dict[r.key].dim() >= 2]


def _scaled(w: torch.Tensor, axis: int, factor: torch.Tensor, block: int) -> torch.Tensor:
    shape = [1] * w.dim()
    shape[axis] = -1
    return w * factor.to(w.device, w.dtype).repeat_interleave(block).view(shape)


def drop_units(
    spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor], kept: Mapping[str, torch.Tensor]
) -> StateDict:
    """``state_dict`` with, in every group of ``kept``, the dropped units' outgoing weights zeroed and the
    kept units' multiplied by ``n / k`` (a group keeping all its units is multiplied by 1: unchanged)."""
    hidden_groups(spec, state_dict)
    out = {k: v.detach() for k, v in state_dict.items()}
    for g, mask in kept.items():
        factor = mask.double() * (len(mask) / int(mask.sum()))
        for key, axis, block in _outgoing(spec, state_dict, g):
            out[key] = _scaled(out[key], axis, factor, block)
    return out


@dataclass
class DropoutStability:
    """Loss and error of a model and of its dropout networks (one per sample), and the mean increases."""

    loss: float
    error: float
    dropped_loss: list[float]
    dropped_error: list[float]

    @property
    def loss_gap(self) -> float:
        """Mean over samples of the dropout network's loss minus the full model's (the dropout instability)."""
        return float(np.mean(np.array(self.dropped_loss) - self.loss))

    @property
    def error_gap(self) -> float:
        return float(np.mean(np.array(self.dropped_error) - self.error))


def dropout_stability(
    model: nn.Module,
    spec: PermutationSpec,
    state_dict: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    p: float = 0.5,
    samples: int = 10,
    seed: int = 0,
    batch_size: int = 8192,
) -> DropoutStability:
    """Loss and error on ``(x, y)`` of the model and of ``samples`` dropout networks keeping a fraction ``p``
    of every hidden layer's units (random subsets from a generator seeded by ``seed``)."""
    if samples < 1:
        raise ConfigError(f"dropout samples must be a positive integer, got {samples}")
    gen = torch.Generator().manual_seed(seed)
    full = {k: v.detach() for k, v in state_dict.items()}
    loss, acc = evaluate(model, x, y, batch_size=batch_size, params=full)
    losses, errors = [], []
    for _ in range(samples):
        dropped = drop_units(spec, full, random_kept(spec, p, gen))
        d_loss, d_acc = evaluate(model, x, y, batch_size=batch_size, params=dropped)
        losses.append(d_loss)
        errors.append(1 - d_acc)
    return DropoutStability(loss, 1 - acc, losses, errors)


def _single_unit_layers(spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor]) -> list[tuple[str, int]]:
    """Hidden layers of one unit, as ``(P_<layer>, 1)``: a layer before the last whose weight's output axis
    has size 1. The spec has no group for them (a one-unit group has only the identity), so they are
    found from its layers: every layer with a weight (an entry of two or more axes) but the output layer."""
    weighted = [(name, next(k for k in keys if k in state_dict and state_dict[k].dim() >= 2))
                for name, keys in spec.layers.items()
                if any(k in state_dict and state_dict[k].dim() >= 2 for k in keys)]
    return [(f"P_{name}", int(state_dict[key].shape[0])) for name, key in weighted[:-1]
            if state_dict[key].shape[0] < 2 and not any(spec.axes_to_perm.get(key, (None,))[:1])]


def dropout_path(
    spec: PermutationSpec,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    seed: int = 0,
) -> list[StateDict]:
    """The six corners of the piecewise-linear path from A to B (module docstring): ``[A, A½, A½ with B's
    kept network beside it, output switched to B's, B½, B]``. A keeps a random half ``S`` of every hidden
    layer (``⌊n/2⌋`` units, seeded), B the rest."""
    groups = hidden_groups(spec, sd_a)
    narrow = [(g, n) for g, n in spec.sizes.items() if n < 2] + _single_unit_layers(spec, sd_a)
    if narrow:
        g, n = narrow[0]
        raise ConfigError(f"the dropout path needs at least 2 units per hidden layer; group {g} has {n}")
    gen = torch.Generator().manual_seed(seed)
    kept_a = {}
    for g in groups:
        n = spec.sizes[g]
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.randperm(n, generator=gen)[: n // 2]] = True
        kept_a[g] = mask
    kept_b = {g: ~m for g, m in kept_a.items()}
    a = {k: v.detach() for k, v in sd_a.items()}
    b = {k: v.detach() for k, v in sd_b.items()}
    a_half, b_half = drop_units(spec, a, kept_a), drop_units(spec, b, kept_b)

    def mixed(output_from_b: bool) -> StateDict:
        """B½'s rows for B's kept units (and for the output layer if ``output_from_b``), A½'s elsewhere."""
        out = {}
        for key, wa in a_half.items():
            own = spec.axes_to_perm.get(key, ())
            group = own[0] if own else None
            if group is None:
                out[key] = b_half[key] if output_from_b else wa
            elif not wa.is_floating_point():
                out[key] = wa
            else:
                rows = kept_b[group].to(wa.device).view(-1, *[1] * (wa.dim() - 1))
                out[key] = torch.where(rows, b_half[key], wa)
        return out

    return [a, a_half, mixed(False), mixed(True), b_half, b]


def compare_paths(
    model: nn.Module,
    spec: PermutationSpec,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    splits: Splits,
    alphas: Sequence[float],
    seed: int = 0,
    batch_size: int = 8192,
) -> tuple[list[dict], dict[str, dict[str, dict[str, float]]]]:
    """The linear path and :func:`dropout_path` between A and B, each evaluated at ``alphas`` (the dropout
    path on each of its five segments): curve rows (``method`` ``linear`` or ``dropout_path``, ``alpha``
    the position along the whole path in [0, 1], ``segment`` 0–4 for the dropout path), and per path and
    split the barriers: ``loss``/``error`` as :func:`lmc.core.barriers.barrier` (over the linear baseline
    between the end points) and ``loss_excess``/``error_excess`` = max along the path minus the larger end
    point (the paper's ε-connectivity)."""
    alphas = sorted(float(a) for a in alphas)
    if len(alphas) < 2 or alphas[0] != 0.0 or alphas[-1] != 1.0:
        raise ConfigError(f"path alphas must run from 0 to 1 with at least 2 points, got {alphas}")
    rows = [{**r, "segment": ""} for r in sweep(model, sd_a, sd_b, alphas, splits, "linear", batch_size=batch_size)]
    corners = dropout_path(spec, sd_a, sd_b, seed)
    segments = len(corners) - 1
    for i in range(segments):
        inner = alphas if i == 0 else alphas[1:]  # a corner is evaluated once
        for r in sweep(model, corners[i], corners[i + 1], inner, splits, "dropout_path", batch_size=batch_size):
            rows.append({**r, "alpha": (i + r["alpha"]) / segments, "segment": i})
    barriers: dict = {}
    for method in ("linear", "dropout_path"):
        barriers[method] = {}
        for split in splits:
            sel = sorted((r for r in rows if r["method"] == method and r["split"] == split), key=lambda r: r["alpha"])
            t = np.array([r["alpha"] for r in sel])
            loss = np.array([r["loss"] for r in sel])
            error = 1 - np.array([r["acc"] for r in sel])
            barriers[method][split] = {
                "loss": barrier(t, loss), "error": barrier(t, error),
                "loss_excess": float(loss.max() - max(loss[0], loss[-1])),
                "error_excess": float(error.max() - max(error[0], error[-1])),
            }
    return rows, barriers
