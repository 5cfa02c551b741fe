"""Three differently built user-style models, and one that torch.fx cannot trace.

They are written the way users write models (functional calls, ``torch.cat``, a hand-made
squeeze-excite), not with fxsculpt's helpers, so loading, folding and export are tested on
code the package did not shape. Every constructor takes no arguments (3 input channels,
10 classes by default) so ``--model-class examples.models:ResidualNet`` can build them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualNet(nn.Module):
    """Two residual stages with additive skips (one identity, one 1x1 projection)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.proj = nn.Conv2d(16, 32, 1, stride=2)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(x)))
        x = F.relu(self.proj(x) + self.bn3(self.conv3(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al., CVPR 2018): pool, bottleneck, sigmoid, rescale."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // reduction, 1)
        self.expand = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean(dim=(2, 3), keepdim=True)
        scale = torch.sigmoid(self.expand(F.relu(self.reduce(scale))))
        return x * scale


class SqueezeExciteNet(nn.Module):
    """Depthwise-separable convolutions with squeeze-excite blocks and a Linear head."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(16)
        self.dw1 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.dw1_bn = nn.BatchNorm2d(16)
        self.pw1 = nn.Conv2d(16, 32, 1, bias=False)
        self.pw1_bn = nn.BatchNorm2d(32)
        self.se1 = SqueezeExcite(32)
        self.dw2 = nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32, bias=False)
        self.dw2_bn = nn.BatchNorm2d(32)
        self.pw2 = nn.Conv2d(32, 48, 1, bias=False)
        self.pw2_bn = nn.BatchNorm2d(48)
        self.se2 = SqueezeExcite(48)
        self.head = nn.Linear(48, 32)
        self.head_bn = nn.BatchNorm1d(32)
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.stem_bn(self.stem(x)))
        x = F.relu6(self.dw1_bn(self.dw1(x)))
        x = self.se1(F.relu6(self.pw1_bn(self.pw1(x))))
        x = F.relu6(self.dw2_bn(self.dw2(x)))
        x = self.se2(F.relu6(self.pw2_bn(self.pw2(x))))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(F.relu(self.head_bn(self.head(x))))


class ConcatNet(nn.Module):
    """An inception-like block: 1x1, 3x3 and pooled branches joined with ``torch.cat``."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        self.branch1 = nn.Conv2d(16, 8, 1)
        self.branch3_reduce = nn.Conv2d(16, 8, 1, bias=False)
        self.branch3_bn = nn.BatchNorm2d(8)
        self.branch3 = nn.Conv2d(8, 16, 3, padding=1)
        self.branch_pool = nn.Conv2d(16, 8, 1)
        self.mix = nn.Conv2d(32, 32, 3, stride=2, padding=1, bias=False)
        self.mix_bn = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        a = F.relu(self.branch1(x))
        b = F.relu(self.branch3(F.relu(self.branch3_bn(self.branch3_reduce(x)))))
        c = F.relu(self.branch_pool(F.max_pool2d(x, 3, stride=1, padding=1)))
        x = torch.cat([a, b, c], dim=1)
        x = F.relu(self.mix_bn(self.mix(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DataDependentGate(nn.Module):
    """Picks a branch from the sign of its input's sum: Python control flow on a tensor value."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pos = nn.Conv2d(channels, channels, 3, padding=1)
        self.neg = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # torch.fx cannot trace this line: the branch depends on the data
            return self.pos(x)
        return self.neg(x)


class BranchyNet(nn.Module):
    """A model with data-dependent control flow, for the tracing-error tests and README."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.gate = DataDependentGate(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gate(F.relu(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


MODELS: dict[str, type[nn.Module]] = {
    "residual": ResidualNet,
    "squeeze_excite": SqueezeExciteNet,
    "concat": ConcatNet,
}
