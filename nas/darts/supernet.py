"""The DARTS search network: a stack of cells whose every edge is a :class:`MixedOp`.

Liu et al., ICLR 2019, sec. 2.1 and appendix A.1.1: a cell has two inputs (the outputs of
the two previous cells) and ``steps`` intermediate nodes, each the sum of mixed ops over all
earlier states; the cell's output concatenates the last ``multiplier`` nodes. Cells at 1/3 and
2/3 of the depth are reduction cells (stride 2 on the edges from the inputs, channels
doubled). All normal cells share one α per edge position, all reduction cells another.

The network traces to an fx graph in which every mixed op is one leaf ``call_module`` node
carrying an :class:`~nas.darts.mixed.EdgeInfo`, so discretization can find cells and edges
in the graph without knowing this class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fxsculpt.nas.darts.mixed import EdgeInfo, MixedOp
from fxsculpt.nas.darts.ops import PRIMITIVES, DilConv, FactorizedReduce, ReLUConvBN, build_op


def reduction_layers(layers: int) -> tuple[int, ...]:
    """Indices of the reduction cells: at 1/3 and 2/3 of the depth (the DARTS code's rule)."""
    return (layers // 3, 2 * layers // 3) if layers >= 3 else ()


def edge_count(steps: int) -> int:
    """Edges in one cell: node k has k + 2 incoming edges."""
    return sum(2 + k for k in range(steps))


class SearchCell(nn.Module):
    """One cell of the supernet; ``alphas`` are the shared per-edge α of its cell kind."""

    def __init__(
        self,
        steps: int,
        multiplier: int,
        c_prev_prev: int,
        c_prev: int,
        channels: int,
        reduction: bool,
        reduction_prev: bool,
        alphas: Sequence[nn.Parameter],
        cell_index: int,
        primitives: Sequence[str] = PRIMITIVES,
        lean: bool = True,
    ) -> None:
        super().__init__()
        self.reduction = reduction
        self.steps = steps
        self.multiplier = multiplier
        if reduction_prev:
            self.preprocess0: nn.Module = FactorizedReduce(c_prev_prev, channels, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(c_prev_prev, channels, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(c_prev, channels, 1, 1, 0, affine=False)
        self.edges = nn.ModuleList()
        kind = "reduce" if reduction else "normal"
        index = 0
        for node in range(steps):
            for source in range(node + 2):
                stride = 2 if reduction and source < 2 else 1
                ops = []
                for name in primitives:
                    op = build_op(name, channels, channels, stride, search=True)
                    if op is None:
                        raise ValueError(f"op {name} cannot map {channels} channels at stride {stride}")
                    ops.append(op)
                mixed = MixedOp(
                    ops, primitives, edge=EdgeInfo(kind, cell_index, node, source, multiplier), lean=lean
                )
                mixed.tie_alpha(alphas[index])
                self.edges.append(mixed)
                index += 1

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self.steps):
            total = None
            for j, h in enumerate(states):
                out = self.edges[offset + j](h)
                total = out if total is None else total + out
            offset += len(states)
            states.append(total)
        return torch.cat(states[-self.multiplier :], dim=1)


class SearchNetwork(nn.Module):
    """The DARTS supernet for image classification (defaults: 8 cells, 16 channels, 4 nodes).

    ``lean=False`` computes every edge the way the DARTS code does (the benchmark's baseline).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        channels: int = 16,
        layers: int = 8,
        steps: int = 4,
        multiplier: int = 4,
        stem_multiplier: int = 3,
        primitives: Sequence[str] = PRIMITIVES,
        lean: bool = True,
    ) -> None:
        super().__init__()
        self.steps = steps
        self.multiplier = multiplier
        self.primitives = tuple(primitives)
        n_edges = edge_count(steps)

        def new_alphas() -> list[nn.Parameter]:
            return [nn.Parameter(1e-3 * torch.randn(len(primitives))) for _ in range(n_edges)]

        # Kept as plain lists (not registered here) so that each α is registered only under the
        # name ``alpha`` inside the mixed ops, which is how the IR tells α from weights.
        self._alphas = {"normal": new_alphas(), "reduce": new_alphas()}
        c_curr = stem_multiplier * channels
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr)
        )
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, channels
        self.cells = nn.ModuleList()
        reduction_prev = False
        reductions = reduction_layers(layers)
        for i in range(layers):
            reduction = i in reductions
            if reduction:
                c_curr *= 2
            cell = SearchCell(
                steps,
                multiplier,
                c_prev_prev,
                c_prev,
                c_curr,
                reduction,
                reduction_prev,
                self._alphas["reduce" if reduction else "normal"],
                i,
                primitives,
                lean,
            )
            self.cells.append(cell)
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, multiplier * c_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)
        if not lean:  # the DARTS code's computation throughout: dilated convs as they are
            for module in self.modules():
                if isinstance(module, DilConv):
                    module.phase_split = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        out = self.global_pooling(s1)
        return self.classifier(torch.flatten(out, 1))
