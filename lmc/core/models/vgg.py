"""VGG-11/13/16 (Simonyan & Zisserman) for small images such as CIFAR-10.

``depth`` ∈ {11, 13, 16} picks the layer configuration; every conv has ``base_channels · width ·
{1, 2, 4, 8, 8}`` output channels by stage (64·width … 512·width by default). Each conv is followed by
the normalisation ``norm`` (``batchnorm``, ``layernorm`` = ``GroupNorm(1, C)``, or ``none``) and a ReLU;
each stage ends with a 2×2 max pool while the feature map is at least 2 pixels on both sides. Then a
global average pool and one linear classifier. On 32×32 inputs the five pools reach 1×1, so the average
pool is the identity and the network is the usual CIFAR VGG; the pool makes any input ≥ 8×8 work.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from lmc.core.models._common import NORMS, channel_norm, check_choice, check_positive_int
from lmc.errors import ConfigError

STAGES = {  # convs per stage (five stages, channel multipliers 1, 2, 4, 8, 8)
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
}
MULTIPLIERS = (1, 2, 4, 8, 8)


class VGG(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, depth: int = 16, width: int = 1,
                 norm: str = "batchnorm", base_channels: int = 64):
        check_choice("model.depth for vgg", depth, tuple(STAGES))
        check_choice("model.norm", norm, NORMS)
        check_positive_int("model.width", width)
        check_positive_int("model.base_channels", base_channels)
        if len(input_shape) != 3 or min(input_shape[1:]) < 8:
            raise ConfigError(f"vgg needs image inputs (C, H, W) with H, W ≥ 8, got input shape {tuple(input_shape)}")
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels, h, w = input_shape
        for stage, (convs, mult) in enumerate(zip(STAGES[depth], MULTIPLIERS), start=1):
            out = base_channels * width * mult
            for i in range(1, convs + 1):
                layers[f"conv{stage}_{i}"] = nn.Conv2d(channels, out, 3, padding=1, bias=norm == "none")
                layers[f"norm{stage}_{i}"] = channel_norm(norm, out)
                layers[f"relu{stage}_{i}"] = nn.ReLU()
                channels = out
            if h >= 2 and w >= 2:
                layers[f"pool{stage}"] = nn.MaxPool2d(2)
                h, w = h // 2, w // 2
        self.features = nn.Sequential(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.classifier(self.flatten(self.pool(self.features(x))))

