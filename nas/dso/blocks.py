"""Ops and blocks of the DSO-NAS search space (Zhang et al. 2018, section 3.1, fig. 2).

A *completely connected block* has ``M`` levels of ``N`` ops. The input of op ``i`` is the
λ-weighted sum of the block input and of every op at an earlier level (eq. 1,
``h_i = O_i(Σ_j λ_(j,i) h_j)``); the block output is the sum over ops of a 1×1 conv of each
op's λ-scaled output (the paper's concatenation + 1×1 conv, written as a sum), then BatchNorm
and ReLU, plus the block input (section 3.1, "the output of the block is ... added to the
input"). Every λ is an :class:`~ir.constructs.Gate` (a leaf of the traced graph) initialized
to 1, so the generic dead-structure and shrink machinery prunes the block like any graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fxsculpt.ir.constructs import Gate

#: The four candidate ops of the paper's CIFAR search (section 4.1).
OP_NAMES: tuple[str, ...] = ("sep_conv_3x3", "sep_conv_5x5", "max_pool_3x3", "avg_pool_3x3")


class SepConv(nn.Module):
    """ReLU, depthwise k×k, pointwise 1×1, BatchNorm (a separable convolution, as in DARTS/NASNet)."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.depthwise = nn.Conv2d(
            channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False
        )
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.pointwise(self.depthwise(self.relu(x))))


def make_op(name: str, channels: int) -> nn.Module:
    """One candidate op at stride 1 that keeps the channel count."""
    builders: dict[str, Callable[[], nn.Module]] = {
        "sep_conv_3x3": lambda: SepConv(channels, 3),
        "sep_conv_5x5": lambda: SepConv(channels, 5),
        "max_pool_3x3": lambda: nn.MaxPool2d(3, stride=1, padding=1),
        "avg_pool_3x3": lambda: nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
    }
    if name not in builders:
        raise ValueError(f"unknown DSO op '{name}' (known: {', '.join(builders)})")
    return builders[name]()


class DSOBlock(nn.Module):
    """A completely connected block of ``levels`` × ``len(ops)`` ops with a Gate on every edge."""

    def __init__(self, channels: int, levels: int = 4, ops: tuple[str, ...] = OP_NAMES) -> None:
        super().__init__()
        self.levels, self.width = levels, len(ops)
        self.ops = nn.ModuleList(make_op(name, channels) for _ in range(levels) for name in ops)
        # edges[k] gates source j into op i; sources are the block input (0) and earlier ops (1 + i).
        self.edge_index: list[tuple[int, int]] = []
        edges = []
        for i in range(len(self.ops)):
            level = i // self.width
            for j in range(1 + level * self.width):
                self.edge_index.append((j, i))
                edges.append(Gate())
        self.edges = nn.ModuleList(edges)
        self.out_gates = nn.ModuleList(Gate() for _ in self.ops)
        self.out_convs = nn.ModuleList(nn.Conv2d(channels, channels, 1, bias=False) for _ in self.ops)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states = [x]
        k = 0
        for i, op in enumerate(self.ops):
            level = i // self.width
            total = None
            for j in range(1 + level * self.width):
                term = self.edges[k](states[j])
                total = term if total is None else total + term
                k += 1
            states.append(op(total))
        out = None
        for i in range(len(self.ops)):
            term = self.out_convs[i](self.out_gates[i](states[1 + i]))
            out = term if out is None else out + term
        return x + self.relu(self.bn(out))


class ReductionBlock(nn.Module):
    """Fixed (not searched) stride-2 block between stages: a ResNet basic block with projection."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.proj = nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False)
        self.proj_bn = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.proj_bn(self.proj(x)))


class DSOSupernet(nn.Module):
    """Stem, ``stages`` stages of ``blocks`` searched blocks with reduction blocks between, pool, Linear."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 16,
        stages: int = 3,
        blocks: int = 1,
        levels: int = 4,
        ops: tuple[str, ...] = OP_NAMES,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        layers: list[nn.Module] = []
        channels = width
        for stage in range(stages):
            if stage:
                layers.append(ReductionBlock(channels, channels * 2))
                channels *= 2
            layers.extend(DSOBlock(channels, levels, ops) for _ in range(blocks))
        self.cells = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.cells(self.stem(x))), 1))
