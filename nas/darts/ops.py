"""The eight candidate operations of the DARTS search space (Liu et al., ICLR 2019, sec. 3.1).

Order and names follow the DARTS code's ``PRIMITIVES``: ``none``, ``max_pool_3x3``,
``avg_pool_3x3``, ``skip_connect``, ``sep_conv_3x3``, ``sep_conv_5x5``, ``dil_conv_3x3``,
``dil_conv_5x5``. Convolutions are ReLU-Conv-BN; separable convolutions are applied twice
(paper, sec. 3.1 / appendix A.1); BatchNorm has no affine parameters during the search and
pooling is followed by BatchNorm there (appendix A.1.1).

Every op that starts with a ReLU derives from :class:`ReluFirst` and exposes ``body(relu_x)``,
so a mixed op can compute ``relu(x)`` once per edge and feed it to all such candidates: the
same result, one activation tensor saved for backward instead of four.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: The candidate operations, in the DARTS code's order (index 0 is the zero op).
PRIMITIVES: tuple[str, ...] = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)


class ReluFirst(nn.Module):
    """An op of the form ``body(relu(x))``; ``body`` takes the already rectified input."""

    def body(self, r: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(F.relu(x))


class ReLUConvBN(ReluFirst):
    """ReLU, a dense convolution, BatchNorm: the cells' 1x1 preprocessing."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool = True
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def body(self, r: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(r))


class DilConv(ReluFirst):
    """ReLU, depthwise (dilated) conv, pointwise conv, BatchNorm: ``dil_conv_*``."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        stride: int,
        padding: int,
        dilation: int,
        affine: bool = True,
    ) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(
            c_in, c_in, kernel, stride=stride, padding=padding, dilation=dilation, groups=c_in, bias=False
        )
        self.pointwise = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def body(self, r: torch.Tensor) -> torch.Tensor:
        return self.bn(self.pointwise(self.depthwise(r)))


class SepConv(ReluFirst):
    """A depthwise-separable conv applied twice, the first with the stride: ``sep_conv_*``."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool = True
    ) -> None:
        super().__init__()
        self.first = DilConv(c_in, c_in, kernel, stride, padding, 1, affine)
        self.second = DilConv(c_in, c_out, kernel, 1, padding, 1, affine)

    def body(self, r: torch.Tensor) -> torch.Tensor:
        return self.second(self.first.body(r))


class FactorizedReduce(ReluFirst):
    """ReLU, two 1x1 stride-2 convs on offset grids, concatenated, BatchNorm.

    The DARTS code's ``skip_connect`` at stride 2. The second conv reads the grid shifted by
    one pixel; a zero row/column is padded at the end so that odd sizes work as well (for
    even sizes the result equals the DARTS code's ``x[:, :, 1:, 1:]``).
    """

    def __init__(self, c_in: int, c_out: int, affine: bool = True) -> None:
        super().__init__()
        if c_out % 2:
            raise ValueError("FactorizedReduce needs an even number of output channels")
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def body(self, r: torch.Tensor) -> torch.Tensor:
        shifted = F.pad(r, (0, 1, 0, 1))[:, :, 1:, 1:]
        return self.bn(torch.cat([self.conv_1(r), self.conv_2(shifted)], dim=1))


class Pool(nn.Module):
    """3x3 max or average pooling (average excludes padding), with BatchNorm during search."""

    def __init__(self, kind: str, channels: int, stride: int, bn: bool) -> None:
        super().__init__()
        if kind == "max":
            self.pool: nn.Module = nn.MaxPool2d(3, stride=stride, padding=1)
        else:
            self.pool = nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
        self.bn = nn.BatchNorm2d(channels, affine=False) if bn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(x)
        return self.bn(out) if self.bn is not None else out


class Zero(nn.Module):
    """The ``none`` op: zeros of the output's shape. A mixed op skips it instead of calling it."""

    def __init__(self, c_out: int, stride: int) -> None:
        super().__init__()
        self.c_out = c_out
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sub = x[:, :1, :: self.stride, :: self.stride]
        return sub.mul(0.0).expand(-1, self.c_out, -1, -1)


def build_op(name: str, c_in: int, c_out: int, stride: int, *, search: bool) -> nn.Module | None:
    """Candidate ``name`` mapping ``c_in`` to ``c_out`` channels at ``stride``, or ``None``.

    ``None`` means the op cannot produce that shape (pooling and identity cannot change the
    channel count; the stride-2 skip needs an even ``c_out``). ``search=True`` builds the search
    variant: BatchNorm without affine parameters, and BatchNorm after pooling.
    """
    affine = not search
    if name == "none":
        return Zero(c_out, stride)
    if name in ("max_pool_3x3", "avg_pool_3x3"):
        if c_in != c_out:
            return None
        return Pool(name[:3], c_out, stride, bn=search)
    if name == "skip_connect":
        if stride == 1:
            return nn.Identity() if c_in == c_out else None
        if stride == 2 and c_out % 2 == 0:
            return FactorizedReduce(c_in, c_out, affine)
        return None
    if name.startswith("sep_conv_"):
        kernel = int(name[-1])
        return SepConv(c_in, c_out, kernel, stride, kernel // 2, affine)
    if name.startswith("dil_conv_"):
        kernel = int(name[-1])
        return DilConv(c_in, c_out, kernel, stride, kernel - 1, 2, affine)
    raise ValueError(f"unknown DARTS op '{name}' (known: {', '.join(PRIMITIVES)})")
