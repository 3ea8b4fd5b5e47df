"""A small CNN for 1-D signals such as MNIST-1D (inputs of shape (L,) or (C, L)).

``depth`` conv layers of ``width`` channels (kernel 5, padding 2, stride 2 while the signal is at
least 2 long), each followed by ``norm`` (``batchnorm``, ``layernorm`` = ``GroupNorm(1, C)``, ``none``)
and a ReLU; then the feature map is flattened into one linear classifier — on MNIST-1D (L = 40, depth 3)
that is 25·5 features for width 25, close to the CNN of Greydanus' MNIST-1D paper.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from lmc.core.models._common import NORMS, channel_norm, check_choice, check_positive_int
from lmc.errors import ConfigError


class CNN1d(nn.Sequential):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 32, depth: int = 3,
                 norm: str = "none"):
        check_positive_int("model.width", width)
        check_positive_int("model.depth", depth)
        check_choice("model.norm", norm, NORMS)
        if len(input_shape) not in (1, 2):
            raise ConfigError(f"cnn1d needs 1-D inputs of shape (L,) or (C, L), got input shape {tuple(input_shape)}")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if len(input_shape) == 1:
            layers["unsqueeze"] = nn.Unflatten(1, (1, input_shape[0]))
            channels, length = 1, input_shape[0]
        else:
            channels, length = input_shape
        for i in range(1, depth + 1):
            stride = 2 if length >= 2 else 1
            layers[f"conv{i}"] = nn.Conv1d(channels, width, 5, stride=stride, padding=2, bias=norm == "none")
            layers[f"norm{i}"] = channel_norm(norm, width, dims=1)
            layers[f"relu{i}"] = nn.ReLU()
            channels, length = width, (length - 1) // stride + 1
        layers["flatten"] = nn.Flatten()
        layers["head"] = nn.Linear(channels * length, num_classes)
        super().__init__(layers)

