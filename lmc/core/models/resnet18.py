"""ResNet-18, CIFAR variant (kuangliu/pytorch-cifar; the ``resnet18_cifar`` of Sonthalia et al.'s star-domain
code), with a width multiplier.

A 3×3 stem convolution (no max pool), four stages of two basic blocks with ``base_channels · width ·
{1, 2, 4, 8}`` channels (64 … 512 by default), strides 1, 2, 2, 2; the first block of stages 2–4 has a 1×1
conv shortcut with its own normalisation. Global average pool (on 32×32 inputs the 4×4 average pool of the
original), linear head. The basic block is ResNet-20's (:mod:`lmc.core.models.resnet`); this class lives
in a module of its own so that adding it left ResNet-20's source fingerprint, and its stored models, alone.
"""

from __future__ import annotations

from torch import nn

from lmc.core.models._common import NORMS, channel_norm, check_choice, check_positive_int
from lmc.core.models.resnet import BasicBlock
from lmc.errors import ConfigError

BLOCKS = (2, 2, 2, 2)  # basic blocks per stage: 4 stages × 2 blocks × 2 convs + stem + head = 18 layers


class ResNet18(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 1, norm: str = "batchnorm",
                 base_channels: int = 64):
        check_positive_int("model.width", width, maximum=32)
        check_choice("model.norm", norm, NORMS)
        check_positive_int("model.base_channels", base_channels)
        if len(input_shape) != 3 or min(input_shape[1:]) < 8:
            raise ConfigError(f"resnet18 needs image inputs (C, H, W) with H, W ≥ 8, got input shape "
                              f"{tuple(input_shape)}")
        super().__init__()
        c = base_channels * width
        self.conv = nn.Conv2d(input_shape[0], c, 3, padding=1, bias=norm == "none")
        self.norm = channel_norm(norm, c)
        self.relu = nn.ReLU()
        channels, stages = c, []
        for i, blocks in enumerate(BLOCKS):
            out = c * 2**i
            stages.append(nn.Sequential(*(BasicBlock(channels if j == 0 else out, out, 2 if (i > 0 and j == 0) else 1,
                                                     norm) for j in range(blocks))))
            channels = out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.relu(self.norm(self.conv(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.pool(x)))
