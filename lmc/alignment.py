"""Alignment methods behind one interface: ``align(method, spec, model_a, model_b, data, **options)``
returns the permutation of B that aligns it to A (apply it with :func:`lmc.apply_permutation`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from lmc.data import Dataset
from lmc.errors import ConfigError
from lmc.permutation import Permutation, PermutationSpec, weight_matching

__all__ = ["ALIGN_METHODS", "align"]

ALIGN_METHODS = ("weight_matching", "none")


def _parameters(model: nn.Module) -> dict:
    return {k: v.detach() for k, v in model.named_parameters()}


def align(
    method: str,
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    data: Dataset | None = None,
    options: Mapping[str, Any] | None = None,
) -> Permutation | None:
    """Permutation of ``model_b`` aligning it to ``model_a`` by ``method`` (``None`` for ``none``)."""
    options = dict(options or {})
    if method == "none":
        return None
    if method == "weight_matching":
        return weight_matching(
            spec,
            _parameters(model_a),
            _parameters(model_b),
            max_iter=int(options.get("max_iter", 100)),
            seed=int(options.get("seed", 0)),
        )
    raise ConfigError(f"unknown align.method '{method}'; valid: {', '.join(ALIGN_METHODS)}")
