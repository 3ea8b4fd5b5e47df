"""Interpolating normalised networks: BatchNorm statistics reset and REPAIR.

The midpoint of two networks has activations whose per-channel statistics collapse (Jordan et al.,
"REPAIR: REnormalizing Permuted Activations for Interpolation Repair", 2022). Two corrections, each a
function ``params -> params`` applied to the interpolated state dict before it is evaluated:

- :func:`reset_bn_stats` recomputes every BatchNorm's running mean/variance on training batches
  (the interpolated running statistics of the endpoints are not the statistics of the interpolated
  network).
- :class:`Repair` rescales every channel at the output of each conv/linear layer (after its
  normalisation layer, if any; before the nonlinearity) so that its mean and standard deviation on
  training batches equal the α-interpolation of the same channel's statistics in the endpoints:
  ``μ_goal = (1 − α)·μ_A + α·μ_B``, ``σ_goal = (1 − α)·σ_A + α·σ_B``. The correction is the affine
  map ``y ↦ (y − μ)·σ_goal/σ + μ_goal`` per channel, fused into that layer's weight and bias, so the
  repaired network is an ordinary state dict. As in the REPAIR code, the interpolated network's own
  statistics are measured in one pass per batch where every corrected layer already normalises with
  the batch's statistics (so later layers see corrected inputs), accumulated over all batches.
  Works for networks without normalisation layers too; the classifier (last layer) is left alone.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lmc.errors import ConfigError

__all__ = ["Repair", "check_reset_bn", "corrections", "has_batchnorm", "reset_bn_stats", "resolve_reset_bn",
           "stat_batches"]

_AFFINE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def check_reset_bn(value) -> None:
    """``interp.reset_bn`` is ``auto``, ``true`` or ``false``."""
    if value != "auto" and not isinstance(value, bool):
        raise ConfigError(f"interp.reset_bn must be auto, true or false, got {value!r}")


def resolve_reset_bn(value, model: nn.Module) -> bool:
    """``interp.reset_bn``: ``auto`` means "if the model has BatchNorm"."""
    check_reset_bn(value)
    return has_batchnorm(model) if value == "auto" else value


def stat_batches(x: torch.Tensor, num_batches: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """``num_batches`` batches of ``x`` without repetition (as many as fit), drawn with ``seed``."""
    if num_batches < 1 or batch_size < 1:
        raise ConfigError(f"interp.stat_batches and interp.stat_batch_size must be positive integers, "
                          f"got {num_batches} and {batch_size}")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(x.device)
    order = order[: num_batches * batch_size]
    return [x[order[i : i + batch_size]] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def reset_bn_stats(model: nn.Module, params: Mapping[str, torch.Tensor], batches: list[torch.Tensor]) -> dict:
    """``params`` with every BatchNorm's running statistics recomputed on ``batches`` (cumulative
    average over the batches, as with ``momentum=None``); other entries unchanged. ``model`` is untouched."""
    net = copy.deepcopy(model)
    net.load_state_dict(params)
    for m in net.modules():
        if isinstance(m, _BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    for xb in batches:
        net(xb)
    out = dict(params)
    out.update({k: v for k, v in net.state_dict().items() if k in params})
    return out


def _targets(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the modules REPAIR corrects, in execution order: every normalisation layer with an
    affine weight and bias, and every conv/linear layer with a bias not followed by a normalisation
    layer; the last such layer (the classifier) excluded."""
    order: list[tuple[str, nn.Module]] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: order.append((name, mod)))
             for name, m in model.named_modules() if isinstance(m, _AFFINE + _NORMS)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    names = []
    for i, (name, mod) in enumerate(order[:-1]):
        if getattr(mod, "weight", None) is None or getattr(mod, "bias", None) is None:
            continue
        if isinstance(mod, _AFFINE) and isinstance(order[i + 1][1], _NORMS):
            continue  # its normalisation layer is corrected instead
        names.append(name)
    return names


def _channel_moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel (axis 1) sum and sum of squares over all other axes, and the count."""
    dims = [d for d in range(y.dim()) if d != 1]
    y = y.double()
    return y.sum(dims), (y * y).sum(dims), y.numel() // y.shape[1]


class _Moments:
    def __init__(self) -> None:
        self.s = self.ss = None
        self.n = 0

    def add(self, y: torch.Tensor) -> None:
        s, ss, n = _channel_moments(y)
        self.s, self.ss = (s, ss) if self.s is None else (self.s + s, self.ss + ss)
        self.n += n

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.s / self.n
        return mean, (self.ss / self.n - mean * mean).clamp_min(0).sqrt()


class Repair:
    """REPAIR for interpolations between ``sd_a`` and ``sd_b`` (``model``'s state dicts, B already
    aligned): ``Repair(...)(alpha, params)`` returns ``params`` with every target channel rescaled to
    the interpolated endpoint statistics on ``batches``."""

    def __init__(self, model: nn.Module, sd_a: Mapping[str, torch.Tensor], sd_b: Mapping[str, torch.Tensor],
                 batches: list[torch.Tensor], eps: float = 1e-8):
        self.model, self.batches, self.eps = model, batches, eps
        self.targets = _targets(model, batches[0])
        self.stats_a = self._measure(sd_a)
        self.stats_b = self._measure(sd_b)

    @torch.no_grad()
    def _measure(self, params, goals=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per-target channel mean/std of ``model`` with ``params`` on the batches. With ``goals``,
        each target's output is also replaced by its batch-normalised version rescaled to the goal."""
        modules = dict(self.model.named_modules())
        moments = {name: _Moments() for name in self.targets}

        def hook(mod, inputs, y, name):
            moments[name].add(y)
            if goals is None:
                return None
            dims = [d for d in range(y.dim()) if d != 1]
            shape = [1] * y.dim()
            shape[1] = -1
            mean = y.mean(dims, keepdim=True)
            std = y.var(dims, keepdim=True, unbiased=False).sqrt() + self.eps
            g_mean, g_std = (t.to(y.dtype).view(shape) for t in goals[name])
            return (y - mean) / std * g_std + g_mean

        hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: hook(m, i, o, n)) for n in self.targets]
        was_training = self.model.training
        try:
            self.model.eval()
            for xb in self.batches:
                torch.func.functional_call(self.model, dict(params), (xb,))
        finally:
            for h in hooks:
                h.remove()
            self.model.train(was_training)
        return {name: m.mean_std() for name, m in moments.items()}

    def goals(self, alpha: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {name: tuple(torch.lerp(a, b, float(alpha)) for a, b in zip(self.stats_a[name], self.stats_b[name]))
                for name in self.targets}

    def __call__(self, alpha: float, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        goals = self.goals(alpha)
        current = self._measure(params, goals)
        out = dict(params)
        for name in self.targets:
            (mean, std), (g_mean, g_std) = current[name], goals[name]
            scale = g_std / (std + self.eps)
            w, b = out[f"{name}.weight"], out[f"{name}.bias"]
            out[f"{name}.weight"] = w * scale.to(w.dtype).view(-1, *[1] * (w.dim() - 1))
            shift = (g_mean - mean * scale).to(b.dtype).view(-1, *[1] * (b.dim() - 1))
            out[f"{name}.bias"] = b * scale.to(b.dtype).view(-1, *[1] * (b.dim() - 1)) + shift
        return out


Correction = Callable[[float, dict], dict]


def corrections(
    model: nn.Module,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    batches: list[torch.Tensor],
    reset_bn: bool,
    repair: bool,
) -> tuple[Correction | None, str]:
    """The per-α correction for :func:`lmc.interpolation.sweep` (BatchNorm reset, then REPAIR) and the
    suffix it adds to the curves' method label (``+reset_bn``, ``+repair``, both, or nothing)."""
    if not (reset_bn or repair):
        return None, ""
    repairer = Repair(model, sd_a, sd_b, batches) if repair else None

    def correct(alpha: float, params: dict) -> dict:
        if reset_bn:
            params = reset_bn_stats(model, params, batches)
        if repairer is not None:
            params = repairer(alpha, params)
        return params

    return correct, "+reset_bn" * reset_bn + "+repair" * repair
