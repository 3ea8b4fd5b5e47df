"""Multi-layer perceptron: ``depth`` hidden layers of ``width`` ReLU units, then a linear head."""

from __future__ import annotations

import math
from collections import OrderedDict

from torch import nn


class MLP(nn.Sequential):
    def __init__(self, in_features: int, num_classes: int, width: int = 512, depth: int = 3):
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        features = in_features
        for i in range(1, depth + 1):
            layers[f"fc{i}"] = nn.Linear(features, width)
            layers[f"relu{i}"] = nn.ReLU()
            features = width
        layers["head"] = nn.Linear(features, num_classes)
        super().__init__(layers)


def build(input_shape: tuple[int, ...], num_classes: int, width: int = 512, depth: int = 3, **_) -> MLP:
    return MLP(math.prod(input_shape), num_classes, width=width, depth=depth)
