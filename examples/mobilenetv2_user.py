"""A user's MobileNetV2-style model for 32x32 images: 31 convolutions (20 1x1, 10 depthwise).

Written the way a user writes one (a block class with functional ReLU6, a list of block
settings), not with fxsculpt's helpers: stem 3x3 conv, ten inverted residual blocks
(expand 1x1, depthwise 3x3, project 1x1; the first without expansion), a 1x1 head, pooling and
a Linear classifier. It is the model of the DARTS relaxation benchmark and of the issue's CLI
run; save it with

    python examples/mobilenetv2_user.py model.pt

and load it with ``--trust-model`` (a full pickle) or ``--model-class
examples.mobilenetv2_user:UserMobileNetV2`` (a state dict).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: (expansion, output channels, stride) of each inverted residual block.
BLOCKS: tuple[tuple[int, int, int], ...] = (
    (1, 16, 1),
    (6, 24, 2),
    (6, 24, 1),
    (6, 32, 2),
    (6, 32, 1),
    (6, 32, 1),
    (6, 64, 2),
    (6, 64, 1),
    (6, 96, 1),
    (6, 96, 1),
)


class Block(nn.Module):
    """Inverted residual with a linear bottleneck (Sandler et al., CVPR 2018, sec. 3.3)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        self.expand = nn.Conv2d(c_in, hidden, 1, bias=False) if expansion != 1 else None
        self.expand_bn = nn.BatchNorm2d(hidden) if expansion != 1 else None
        self.depthwise = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, c_out, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.expand is not None and self.expand_bn is not None:
            out = F.relu6(self.expand_bn(self.expand(out)))
        out = F.relu6(self.depthwise_bn(self.depthwise(out)))
        out = self.project_bn(self.project(out))
        return x + out if self.residual else out


class UserMobileNetV2(nn.Module):
    """Stem, the ten blocks of :data:`BLOCKS`, a 1x1 head to 320 channels, pool, Linear."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 32, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(32)
        blocks = []
        channels = 32
        for expansion, c_out, stride in BLOCKS:
            blocks.append(Block(channels, c_out, stride, expansion))
            channels = c_out
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(channels, 320, 1, bias=False)
        self.head_bn = nn.BatchNorm2d(320)
        self.classifier = nn.Linear(320, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        x = F.relu6(self.head_bn(self.head(x)))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="save UserMobileNetV2 with torch.save")
    parser.add_argument("out", type=Path, help="file to write, e.g. model.pt")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--state-dict", action="store_true", help="save the state dict, not the module")
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parent.parent
    if str(root) not in sys.path:  # so the pickle names the class examples.mobilenetv2_user.*
        sys.path.insert(0, str(root))
    from examples.mobilenetv2_user import UserMobileNetV2 as Importable

    torch.manual_seed(args.seed)
    model = Importable().eval()
    torch.save(model.state_dict() if args.state_dict else model, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
