"""Small random CNNs for property tests: residual adds, concatenations, depthwise and grouped
convs, pooling and a Linear head, described by a list of block specs Hypothesis can draw."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import nn

BLOCK_KINDS = ("conv", "depthwise", "grouped", "residual", "concat", "maxpool", "avgpool")


@dataclass(frozen=True)
class BlockSpec:
    kind: str
    width: int  # output channels (ignored by shape-keeping blocks)
    kernel: int
    stride: int
    bn: bool


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int, groups: int, bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=not bn)
    ]
    if bn:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, channels: int, kernel: int, bn: bool) -> None:
        super().__init__()
        self.body = conv_bn(channels, channels, kernel, 1, 1, bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Concat(nn.Module):
    def __init__(self, c_in: int, width: int, kernel: int, bn: bool) -> None:
        super().__init__()
        self.left = conv_bn(c_in, width, 1, 1, 1, bn)
        self.right = conv_bn(c_in, width, kernel, 1, 1, bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.left(x), self.right(x)], dim=1)


class RandomCNN(nn.Module):
    """A CNN built from block specs; channels are tracked so every spec yields a valid net."""

    def __init__(self, specs: list[BlockSpec], in_channels: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c = in_channels
        for spec in specs:
            if spec.kind == "conv":
                blocks.append(conv_bn(c, spec.width, spec.kernel, spec.stride, 1, spec.bn))
                c = spec.width
            elif spec.kind == "depthwise":
                blocks.append(conv_bn(c, c, spec.kernel, spec.stride, c, spec.bn))
            elif spec.kind == "grouped":
                groups = 2 if c % 2 == 0 else 1
                width = spec.width - spec.width % groups or groups
                blocks.append(conv_bn(c, width, spec.kernel, spec.stride, groups, spec.bn))
                c = width
            elif spec.kind == "residual":
                blocks.append(Residual(c, spec.kernel, spec.bn))
            elif spec.kind == "concat":
                blocks.append(Concat(c, spec.width, spec.kernel, spec.bn))
                c = 2 * spec.width
            elif spec.kind == "maxpool":
                blocks.append(nn.MaxPool2d(3, spec.stride, 1))
            else:
                blocks.append(nn.AvgPool2d(3, spec.stride, 1))
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(torch.flatten(self.pool(x), 1))


block_specs = st.builds(
    BlockSpec,
    kind=st.sampled_from(BLOCK_KINDS),
    width=st.integers(2, 12),
    kernel=st.sampled_from((1, 3, 5)),
    stride=st.sampled_from((1, 1, 2)),
    bn=st.booleans(),
)
cnn_specs = st.lists(block_specs, min_size=1, max_size=5)


def build(specs: list[BlockSpec], seed: int) -> RandomCNN:
    """The network for ``specs`` with seeded weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = RandomCNN(specs)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.2)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(module.num_features, generator=generator))
    return model.eval()
