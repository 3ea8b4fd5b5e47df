"""Model zoo. Each model is one module with a ``build(input_shape, num_classes, **cfg)`` function and
no permutation code: permutation specs are derived by :func:`lmc.permutation_spec`."""

from __future__ import annotations

import importlib

from torch import nn

from lmc.errors import ConfigError

MODELS = {
    "mlp": "lmc.core.models.mlp",
    "vgg": "lmc.core.models.vgg",
    "resnet20": "lmc.core.models.resnet",
    "cnn1d": "lmc.core.models.cnn1d",
}

__all__ = ["MODELS", "build_model"]


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module:
    """Build model ``name`` for inputs of ``input_shape`` (without batch axis) and ``num_classes``."""
    if name not in MODELS:
        raise ConfigError(f"unknown model '{name}'; valid: {', '.join(sorted(MODELS))}")
    for key in ("width", "depth"):
        if key in kwargs and kwargs[key] is not None and int(kwargs[key]) <= 0:
            raise ConfigError(f"model.{key} must be a positive integer, got {kwargs[key]}")
    return importlib.import_module(MODELS[name]).build(tuple(input_shape), num_classes, **kwargs)
