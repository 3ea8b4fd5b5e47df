"""Alignment methods behind one interface: ``align(method, spec, model_a, model_b, data, **options)``
returns the permutation of B that aligns it to A (apply it with :func:`lmc.apply_permutation`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from lmc.data import Dataset
from lmc.errors import ConfigError
from lmc.permutation import Permutation, PermutationSpec, weight_matching

__all__ = ["ALIGN_METHODS", "align", "check_same_architecture"]

ALIGN_METHODS = ("weight_matching", "none")


def _parameters(model: nn.Module) -> dict:
    return {k: v.detach() for k, v in model.named_parameters()}


def check_same_architecture(model_a: nn.Module, model_b: nn.Module) -> None:
    """ConfigError unless both models have the same parameter and buffer names and shapes."""
    shapes_a = {k: tuple(v.shape) for k, v in model_a.state_dict().items()}
    shapes_b = {k: tuple(v.shape) for k, v in model_b.state_dict().items()}
    if shapes_a != shapes_b:
        diff = next(k for k in [*shapes_a, *shapes_b] if shapes_a.get(k) != shapes_b.get(k))
        raise ConfigError(f"cannot align models of different architectures: '{diff}' is {shapes_a.get(diff)} in "
                          f"model A and {shapes_b.get(diff)} in model B")


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
    check_same_architecture(model_a, model_b)
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
