"""``builtin:resnet``: a small CIFAR-style ResNet (He et al., CVPR 2016, section 4.2).

Three stages of basic blocks (two 3x3 convs with BatchNorm, a residual add) at widths
``w, 2w, 4w`` (16/32/64 by default); the second and third stages halve the resolution.
Where a block changes shape the shortcut is a 1x1 projection with BatchNorm (the paper's
option B) instead of zero padding, so every add is an ordinary traced ``add``. Adaptive
average pooling makes the net run on any input of at least 1x1 (8x8 digits, 28x28 MNIST).

Options (``--model-opt``): ``blocks`` per stage (default 2: 0.18 M parameters,
27 M MACs at 32x32) and ``width`` of the first stage (default 16).
"""

from __future__ import annotations

import torch
from torch import nn

from fxsculpt.zoo import BuiltinSpec
from fxsculpt.zoo._options import check_known, check_spec, int_option


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU (He et al. 2016, fig. 2 left)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem conv, three stages of :class:`BasicBlock`, global average pool, Linear classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, blocks: int = 2, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        channels = width
        for index, out_channels in enumerate((width, 2 * width, 4 * width)):
            layers: list[nn.Module] = []
            for block in range(blocks):
                stride = 2 if index > 0 and block == 0 else 1
                layers.append(BasicBlock(channels, out_channels, stride))
                channels = out_channels
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def build_resnet(spec: BuiltinSpec) -> nn.Module:
    """``builtin:resnet`` for ``spec.num_classes`` classes and ``spec.in_channels`` channels."""
    check_spec(spec, "resnet")
    check_known(spec, "resnet", ("blocks", "width"))
    return SmallResNet(
        num_classes=spec.num_classes,
        in_channels=spec.in_channels,
        blocks=int_option(spec, "resnet", "blocks", 2),
        width=int_option(spec, "resnet", "width", 16),
    )


BUILTINS = {"resnet": build_resnet}
