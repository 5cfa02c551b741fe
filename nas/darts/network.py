"""The DARTS evaluation network: a cell stack built from a genotype, trained from scratch.

Liu et al., ICLR 2019, sec. 3.2 and appendix A.2: 20 cells with 36 initial channels for
CIFAR-10, reduction cells at 1/3 and 2/3 of the depth, BatchNorm with affine parameters,
an auxiliary classifier after the cell at 2/3 of the depth (weight 0.4), drop path (0.2) and
cutout (16 px) as training regularizers.

``forward`` returns the logits only, so the traced IR holds the inference network: the
auxiliary head is not on that path and is therefore not part of the IR (nor of its parameter
count, matching how the DARTS code counts parameters). Training code that wants the auxiliary
loss calls :meth:`EvalNetwork.forward_with_aux` on the module itself.

Drop path is ``x * dropout(ones(batch, 1, 1, 1))``: ``nn.Dropout`` is a leaf module that reads
its ``training`` flag and ``p`` when it runs, so the traced graph keeps drop path working in
training and is an exact identity in eval mode (and in ONNX).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fxsculpt.nas.darts.genotype import Genotype
from fxsculpt.nas.darts.ops import FactorizedReduce, ReLUConvBN, build_op
from fxsculpt.nas.darts.supernet import reduction_layers


class DropPath(nn.Module):
    """Zero a whole sample's branch with probability ``p`` in training, scaling by 1/(1-p)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.dropout(x.new_ones(x.shape[0], 1, 1, 1))
        return x * mask


class EvalCell(nn.Module):
    """A discrete cell: each node sums two ops of the genotype, outputs concatenated."""

    def __init__(
        self,
        genotype: Genotype,
        c_prev_prev: int,
        c_prev: int,
        channels: int,
        reduction: bool,
        reduction_prev: bool,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if reduction_prev:
            self.preprocess0: nn.Module = FactorizedReduce(c_prev_prev, channels)
        else:
            self.preprocess0 = ReLUConvBN(c_prev_prev, channels, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(c_prev, channels, 1, 1, 0)
        pairs = genotype.reduce if reduction else genotype.normal
        self.concat = list(genotype.reduce_concat if reduction else genotype.normal_concat)
        self.steps = len(pairs) // 2
        self.inputs = [j for _, j in pairs]
        self.ops = nn.ModuleList()
        self.drops = nn.ModuleList()
        for name, j in pairs:
            stride = 2 if reduction and j < 2 else 1
            op = build_op(name, channels, channels, stride, search=False)
            if op is None:
                raise ValueError(f"op {name} cannot map {channels} channels at stride {stride}")
            self.ops.append(op)
            # The DARTS code drops every op of a node except identities.
            use_drop = drop_path > 0 and not isinstance(op, nn.Identity)
            self.drops.append(DropPath(drop_path) if use_drop else nn.Identity())

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for k in range(self.steps):
            a, b = 2 * k, 2 * k + 1
            h1 = self.drops[a](self.ops[a](states[self.inputs[a]]))
            h2 = self.drops[b](self.ops[b](states[self.inputs[b]]))
            states.append(h1 + h2)
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """The DARTS code's CIFAR auxiliary classifier (on 8x8 maps), pooled to 1x1 for other sizes."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False),
            nn.Conv2d(channels, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class EvalNetwork(nn.Module):
    """NetworkCIFAR of the DARTS code: stem, ``layers`` cells, global pooling, classifier."""

    def __init__(
        self,
        genotype: Genotype,
        num_classes: int = 10,
        in_channels: int = 3,
        channels: int = 36,
        layers: int = 20,
        auxiliary: bool = True,
        drop_path: float = 0.0,
        stem_multiplier: int = 3,
    ) -> None:
        super().__init__()
        self.genotype = genotype
        self.aux_index = 2 * layers // 3
        c_curr = stem_multiplier * channels
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr)
        )
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, channels
        self.cells = nn.ModuleList()
        reduction_prev = False
        reductions = reduction_layers(layers)
        c_aux = None
        for i in range(layers):
            reduction = i in reductions
            if reduction:
                c_curr *= 2
            cell = EvalCell(genotype, c_prev_prev, c_prev, c_curr, reduction, reduction_prev, drop_path)
            self.cells.append(cell)
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, len(cell.concat) * c_curr
            if i == self.aux_index:
                c_aux = c_prev
        self.auxiliary_head = AuxiliaryHead(c_aux, num_classes) if auxiliary and c_aux else None
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.classifier(torch.flatten(self.global_pooling(s1), 1))

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and the auxiliary head's logits (``None`` without a head): for training."""
        aux = None
        s0 = s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1)
            if i == self.aux_index and self.auxiliary_head is not None:
                aux = self.auxiliary_head(s1)
        return self.classifier(torch.flatten(self.global_pooling(s1), 1)), aux

    def set_drop_path(self, p: float) -> None:
        """Change the drop-path probability (the DARTS code ramps it up linearly per epoch)."""
        for module in self.modules():
            if isinstance(module, DropPath):
                module.dropout.p = p

    def aux_parameter_count(self) -> int:
        return sum(p.numel() for p in self.auxiliary_head.parameters()) if self.auxiliary_head else 0


def parameter_count(model: nn.Module, exclude: Sequence[str] = ("auxiliary",)) -> int:
    """Trainable parameters whose names contain none of ``exclude`` (the DARTS code's count)."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if p.requires_grad and not any(e in name for e in exclude)
    )
