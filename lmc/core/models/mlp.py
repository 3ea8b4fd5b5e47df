"""Multi-layer perceptron: ``depth`` hidden layers of ``width`` ReLU units, then a linear head."""

from __future__ import annotations

import math
from collections import OrderedDict

from torch import nn

from lmc.core.models._common import check_positive_int


class MLP(nn.Sequential):
    """Inputs of any shape are flattened first (MNIST-1D's 40 values, MNIST's 1×28×28 pixels)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 512, depth: int = 3):
        check_positive_int("model.width", width)
        check_positive_int("model.depth", depth)
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        features = math.prod(input_shape)
        for i in range(1, depth + 1):
            layers[f"fc{i}"] = nn.Linear(features, width)
            layers[f"relu{i}"] = nn.ReLU()
            features = width
        layers["head"] = nn.Linear(features, num_classes)
        super().__init__(layers)
