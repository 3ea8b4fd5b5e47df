"""Small helpers shared by the model zoo: argument checks and normalisation layers."""

from __future__ import annotations

from torch import nn

from lmc.errors import ConfigError

NORMS = ("batchnorm", "layernorm", "none")


def check_choice(what: str, value, valid) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {what} '{value}'; valid: {', '.join(str(v) for v in valid)}")


def check_positive_int(what: str, value, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (maximum and value > maximum):
        valid = f"an integer in 1..{maximum}" if maximum else "a positive integer"
        raise ConfigError(f"{what} must be {valid}, got {value!r}")
    return value


def channel_norm(norm: str, channels: int, dims: int = 2) -> nn.Module:
    """Normalisation of a (N, C, *spatial) feature map.

    ``layernorm`` is ``GroupNorm(1, C)``: LayerNorm over (C, *spatial) with a per-channel affine, the
    layer normalisation that Git Re-Basin's ResNet-20 uses on convolutional features.
    """
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)
    if norm == "layernorm":
        return nn.GroupNorm(1, channels)
    return nn.Identity()
