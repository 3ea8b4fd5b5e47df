"""Model zoo: one class per module, no permutation code (specs are derived by
:func:`lmc.permutation_spec`), except where tracing cannot see a symmetry: such a model declares it
(``model.symmetry()``, e.g. the soft tree ensembles' subtree flips), and the pipeline uses that instead.

Every model class — the zoo's and a user's own, named by ``model._target_`` — is built the same way:
``cls(input_shape, num_classes, **options)``, where ``input_shape`` is one example's shape (no batch
axis) and ``num_classes`` the number of labels, both read off the data; ``options`` are the class's
own keyword arguments (``model.<key>`` on the command line), checked against its signature.
"""

from __future__ import annotations

from torch import nn

from lmc.core.models.cnn1d import CNN1d
from lmc.core.models.mlp import MLP
from lmc.core.models.resnet import ResNet20
from lmc.core.models.resnet18 import ResNet18
from lmc.core.models.trees import SoftTreeEnsemble
from lmc.core.models.vgg import VGG
from lmc.errors import ConfigError
from lmc.settings import parse_options

__all__ = ["CNN1d", "MLP", "MODELS", "ResNet18", "ResNet20", "SoftTreeEnsemble", "VGG", "build_model"]

MODELS: dict[str, type[nn.Module]] = {  # model.name -> class
    "mlp": MLP,
    "vgg": VGG,
    "resnet20": ResNet20,
    "resnet18": ResNet18,
    "cnn1d": CNN1d,
    "soft_trees": SoftTreeEnsemble,
}


def build_model(name: str | type[nn.Module], input_shape: tuple[int, ...], num_classes: int, **options) -> nn.Module:
    """Model ``name`` (a zoo name, or a model class) for inputs of ``input_shape`` (without batch axis)
    and ``num_classes``; ``options`` are checked against the class's signature (ConfigError)."""
    if isinstance(name, str):
        if name not in MODELS:
            raise ConfigError(f"unknown model '{name}'; valid: {', '.join(sorted(MODELS))}")
        cls, what = MODELS[name], f"model '{name}'"
    else:
        cls, what = name, f"model {name.__module__}.{name.__qualname__}"
    return cls(tuple(input_shape), num_classes, **parse_options(cls, options, "model", what, skip=2))
