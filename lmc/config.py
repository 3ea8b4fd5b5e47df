"""Checks on a composed run configuration that need more than a type: seeds, device, choices.

Each failure raises :class:`lmc.errors.ConfigError` naming the bad value and what would be valid.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lmc.core.alignment import ALIGN_METHODS
from lmc.core.data import DATASETS
from lmc.core.models import MODELS
from lmc.errors import ConfigError

__all__ = ["DEVICES", "check_choices", "check_group_choices", "check_seeds", "resolve_device"]

DEVICES = ("auto", "cpu", "cuda")


def check_seeds(seeds: Sequence, count: int = 2, at_least: bool = False, name: str = "seeds",
                distinct: bool = True) -> list[int]:
    """``seeds`` as a list of ``count`` (or, with ``at_least``, ``count`` or more) integers, distinct unless
    ``distinct=False``; ``name`` is the config key named in the error."""
    try:
        values = list(seeds)
    except TypeError:
        values = None
    if (
        values is None
        or (len(values) < count if at_least else len(values) != count)
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in values)
        or (distinct and len(set(values)) != len(values))
    ):
        example = ",".join(str(i) for i in range(count + at_least))
        kind = "distinct integers" if distinct else "integers"
        if at_least:
            raise ConfigError(f"{name} must be at least {count} {kind} when merging several models, "
                              f"e.g. {name}=[{example}]; got {_show(seeds)}")
        raise ConfigError(f"{name} must be {count} {kind}, e.g. {name}=[{example}]; got {_show(seeds)}")
    return values


def _show(value) -> str:
    return str(OmegaConf.to_container(value)) if OmegaConf.is_config(value) else str(value)


def check_choices(data_name: str, model_name: str, align_method: str) -> None:
    for what, value, valid in (
        ("data.name", data_name, DATASETS),
        ("model.name", model_name, MODELS),
        ("align.method", align_method, ALIGN_METHODS),
    ):
        if value not in valid:
            raise ConfigError(f"unknown {what} '{value}'; valid: {', '.join(sorted(valid))}")


def check_group_choices(overrides: Sequence[str], conf_dir: str | Path) -> None:
    """Command-line choices of config groups (``experiment=foo``, ``model=a,b``) must name files in
    ``conf_dir/<group>/``; Hydra's own error for a missing one spans several lines."""
    conf_dir = Path(conf_dir)
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        group = conf_dir / key
        if not sep or key.startswith(("hydra", "-")) or not group.is_dir() or "(" in value or not value:
            continue
        valid = sorted(p.stem for p in group.glob("*.yaml"))
        for choice in value.split(","):
            if choice.strip() not in (*valid, "null"):
                raise ConfigError(f"unknown {key} '{choice.strip()}'; valid: {', '.join(valid)}")


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise ConfigError(f"unknown device '{device}'; valid: {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' requested but no CUDA device is available; use device=cpu or auto")
    return torch.device(device)
