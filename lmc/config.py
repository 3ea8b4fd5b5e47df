"""Checks on a composed run configuration that need more than a type: seeds, device, choices.

Each failure raises :class:`lmc.errors.ConfigError` naming the bad value and what would be valid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmc.alignment import ALIGN_METHODS
from lmc.data import DATASETS
from lmc.errors import ConfigError
from lmc.models import MODELS

__all__ = ["DEVICES", "check_seeds", "check_choices", "resolve_device"]

DEVICES = ("auto", "cpu", "cuda")


def check_seeds(seeds: Sequence, count: int = 2, at_least: bool = False) -> list[int]:
    """``seeds`` as a list of ``count`` (or, with ``at_least``, ``count`` or more) distinct integers."""
    try:
        values = list(seeds)
    except TypeError:
        values = None
    if (
        values is None
        or (len(values) < count if at_least else len(values) != count)
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in values)
        or len(set(values)) != len(values)
    ):
        if at_least:
            raise ConfigError(f"seeds must be at least {count} distinct integers when merging several models, "
                              f"e.g. seeds=[0,1,2]; got {seeds}")
        raise ConfigError(f"seeds must be {count} distinct integers, e.g. seeds=[0,1]; got {seeds}")
    return values


def check_choices(data_name: str, model_name: str, align_method: str) -> None:
    for what, value, valid in (
        ("data.name", data_name, DATASETS),
        ("model.name", model_name, MODELS),
        ("align.method", align_method, ALIGN_METHODS),
    ):
        if value not in valid:
            raise ConfigError(f"unknown {what} '{value}'; valid: {', '.join(sorted(valid))}")


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise ConfigError(f"unknown device '{device}'; valid: {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' requested but no CUDA device is available; use device=cpu or auto")
    return torch.device(device)
