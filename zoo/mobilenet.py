"""``builtin:mobilenet``: a small MobileNetV2-style net (Sandler et al., CVPR 2018).

Inverted residual blocks (section 3.3, table 1): a 1x1 expansion by factor ``t`` with
BatchNorm and ReLU6, a 3x3 depthwise convolution with BatchNorm and ReLU6, and a linear
1x1 projection with BatchNorm and no activation (the linear bottleneck, section 3.2). A
block adds its input back when its stride is 1 and its input and output widths agree.
The stage table is the paper's, shortened, with expansion 4 instead of 6 and CIFAR-sized
strides (the stem keeps 32x32), so the net stays near 0.15 M parameters and an epoch on
the 4,660-image CIFAR subset takes seconds on two cores. Adaptive pooling lets it run on 8x8 and
28x28 inputs too.

Option (``--model-opt``): ``last`` sets the width of the
final 1x1 conv (default 256).
"""

from __future__ import annotations

import torch
from torch import nn

from fxsculpt.zoo import BuiltinSpec
from fxsculpt.zoo._options import check_known, check_spec, int_option

#: (expansion t, output channels c, repeats n, first stride s), as in MobileNetV2 table 2 (t = 4 here).
STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (4, 24, 2, 2),
    (4, 32, 2, 2),
    (4, 64, 2, 2),
    (4, 96, 1, 1),
)


class InvertedResidual(nn.Module):
    """Expand (1x1) - depthwise (3x3) - project (1x1, linear), plus the input when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.body(x)
        return self.body(x)


class SmallMobileNetV2(nn.Module):
    """Stem conv, the inverted-residual stages of :data:`STAGES`, 1x1 conv, pool, Linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, last_channels: int = 256) -> None:
        super().__init__()
        first = STAGES[0][1]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, first, 3, padding=1, bias=False), nn.BatchNorm2d(first), nn.ReLU6()
        )
        blocks: list[nn.Module] = []
        channels = first
        for expansion, out_channels, repeats, stride in STAGES:
            for index in range(repeats):
                blocks.append(
                    InvertedResidual(channels, out_channels, stride if index == 0 else 1, expansion)
                )
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Conv2d(channels, last_channels, 1, bias=False), nn.BatchNorm2d(last_channels), nn.ReLU6()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


def build_mobilenet(spec: BuiltinSpec) -> nn.Module:
    """``builtin:mobilenet`` for ``spec.num_classes`` classes and ``spec.in_channels`` channels."""
    check_spec(spec, "mobilenet")
    check_known(spec, "mobilenet", ("last",))
    return SmallMobileNetV2(
        num_classes=spec.num_classes,
        in_channels=spec.in_channels,
        last_channels=int_option(spec, "mobilenet", "last", 256),
    )


BUILTINS = {"mobilenet": build_mobilenet}
