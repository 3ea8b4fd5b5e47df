"""ResNet-20 (He et al. 2016, CIFAR variant) as used by Git Re-Basin, with a width multiplier.

Three stages of three basic blocks with ``base_channels · width · {1, 2, 4}`` channels (16·width …
64·width by default); the first block of stages 2 and 3 halves the resolution and has a 1×1 conv
shortcut (with its own normalisation), the others the identity. ``norm`` ∈ {``batchnorm``,
``layernorm`` (``GroupNorm(1, C)``, Git Re-Basin's choice), ``none``}. Global average pool, linear head.
Within a stage the residual stream is one permutation group (derived automatically).
"""

from __future__ import annotations

from torch import nn

from lmc.core.models._common import NORMS, channel_norm, check_choice, check_positive_int
from lmc.errors import ConfigError


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str):
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = channel_norm(norm, out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias)
        self.norm2 = channel_norm(norm, out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias),
                                          channel_norm(norm, out_channels))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.norm2(self.conv2(self.relu1(self.norm1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 1, norm: str = "batchnorm",
                 base_channels: int = 16):
        check_positive_int("model.width", width, maximum=32)
        check_choice("model.norm", norm, NORMS)
        check_positive_int("model.base_channels", base_channels)
        if len(input_shape) != 3 or min(input_shape[1:]) < 4:
            raise ConfigError(f"resnet20 needs image inputs (C, H, W) with H, W ≥ 4, "
                              f"got input shape {tuple(input_shape)}")
        super().__init__()
        blocks = 3  # basic blocks per stage: 3 stages × 3 blocks × 2 convs + stem + head = 20 layers
        c = base_channels * width
        self.conv = nn.Conv2d(input_shape[0], c, 3, padding=1, bias=norm == "none")
        self.norm = channel_norm(norm, c)
        self.relu = nn.ReLU()
        stages = []
        channels = c
        for i, mult in enumerate((1, 2, 4)):
            out = c * mult
            stage = []
            for j in range(blocks):
                stage.append(BasicBlock(channels, out, 2 if (i > 0 and j == 0) else 1, norm))
                channels = out
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.relu(self.norm(self.conv(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))

