"""A single-path weight-sharing supernet over the DARTS cell space (ENAS / NAO-WS style).

Every edge ``j -> i`` of a cell holds one instance of every candidate op; a sampled
architecture selects, per intermediate node, two inputs and one op on each, and only those
ops run (Pham et al. 2018, "ENAS", sec. 2.3; Luo et al. 2018, "NAO", sec. 3.4 weight
sharing). All candidates therefore share one set of weights, trained by sampling
architectures, and a candidate is scored by running its path on held-out batches.

The macro skeleton is DARTS's (Liu et al. 2019, sec. 3.1 and its code): a 3x3 stem to
``stem_multiplier * C`` channels, ``layers`` cells with reduction cells at 1/3 and 2/3 of the
depth (channels doubled there), each cell concatenating all its intermediate nodes, then
global average pooling and a linear classifier. BatchNorm inside the supernet is not affine
and keeps no running statistics, so every sampled path normalizes with its own batch
statistics (as NAO-WS evaluates with ``bn_train=True``).
"""

from __future__ import annotations

import torch
from torch import nn

from fxsculpt.nas.darts.ops import FactorizedReduce, ReLUConvBN, build_op
from fxsculpt.nas.darts.supernet import reduction_layers
from fxsculpt.nas.sample.encoding import Arch, CellSpec, SearchSpace


def make_op(name: str, channels: int, stride: int) -> nn.Module:
    """One candidate op from the DARTS op table, search variant (non-affine BatchNorm)."""
    op = build_op(name, channels, channels, stride, search=True)
    if op is None:
        raise ValueError(f"op '{name}' cannot map {channels} channels at stride {stride}")
    return op


class SinglePathCell(nn.Module):
    """A cell holding every op on every edge; ``forward`` runs the one path ``cell`` selects."""

    def __init__(
        self,
        space: SearchSpace,
        c_prev_prev: int,
        c_prev: int,
        channels: int,
        reduction: bool,
        reduction_prev: bool,
    ) -> None:
        super().__init__()
        self.space = space
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0: nn.Module = FactorizedReduce(c_prev_prev, channels, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(c_prev_prev, channels, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(c_prev, channels, 1, 1, 0, affine=False)
        # edges[i][j][k]: op k on the edge from input j to intermediate node i
        self.edges = nn.ModuleList()
        for i in range(space.steps):
            per_input = nn.ModuleList()
            for j in range(i + 2):
                stride = 2 if reduction and j < 2 else 1
                per_input.append(nn.ModuleList(make_op(name, channels, stride) for name in space.ops))
            self.edges.append(per_input)
        self.out_channels = channels * space.steps

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, cell: CellSpec) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i, (in1, op1, in2, op2) in enumerate(cell):
            edges = self.edges[i]
            states.append(edges[in1][op1](states[in1]) + edges[in2][op2](states[in2]))  # type: ignore[index]
        return torch.cat(states[2:], dim=1)


class SinglePathSupernet(nn.Module):
    """The weight-sharing network: ``forward(x, arch)`` runs the sampled architecture's path."""

    def __init__(
        self,
        space: SearchSpace,
        channels: int = 8,
        layers: int = 5,
        num_classes: int = 10,
        in_channels: int = 3,
        stem_multiplier: int = 3,
    ) -> None:
        super().__init__()
        self.space = space
        c_curr = stem_multiplier * channels
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c_curr, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_curr, affine=False, track_running_stats=False),
        )
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, channels
        self.cells = nn.ModuleList()
        reduction_prev = False
        for index in range(layers):
            reduction = index in reduction_layers(layers)
            if reduction:
                c_curr *= 2
            cell = SinglePathCell(space, c_prev_prev, c_prev, c_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, cell.out_channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)
        _no_running_stats(self)

    def forward(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            spec = arch.reduce if cell.reduction else arch.normal  # type: ignore[union-attr]
            s0, s1 = s1, cell(s0, s1, spec)
        return self.classifier(self.pool(s1).flatten(1))


def _no_running_stats(module: nn.Module) -> None:
    """Make every BatchNorm use batch statistics always: a shared running mean fits no single path."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None
