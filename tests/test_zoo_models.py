"""Built-in models and the IR's counts, checked against counts worked out by hand.

Parameter and MAC counts are computed here from the architecture's description (layer
widths, kernel sizes, output resolutions), independently of ``ir.graph``'s counting code.
"""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

from fxsculpt.ir.graph import IR
from fxsculpt.ir.load import LoadOptions, load_ir
from fxsculpt.ir.trace import trace_module
from fxsculpt.zoo import BuiltinSpec, build_builtin


def test_hand_counted_conv_linear_model() -> None:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8 * 4 * 4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.conv(x))
            x = nn.functional.max_pool2d(x, 2)
            return self.fc(torch.flatten(x, 1))

    ir = IR(trace_module(Tiny()), (1, 3, 8, 8), 5)
    ir.propagate()
    conv = next(n for n in ir.gm.graph.nodes if n.target == "conv")
    fc = next(n for n in ir.gm.graph.nodes if n.target == "fc")
    # conv 3->8, 3x3, padding 1 on 8x8: 8 output maps of 8x8, each output needs 3*3*3 MACs.
    assert ir.meta(conv).shape == (1, 8, 8, 8)
    assert ir.meta(conv).macs == 8 * 8 * 8 * (3 * 3 * 3) == 13824
    assert ir.meta(conv).params == 8 * 3 * 3 * 3 + 8 == 224
    # Linear 128 -> 5.
    assert ir.meta(fc).macs == 128 * 5 and ir.meta(fc).params == 128 * 5 + 5
    assert ir.summary()["params"] == 224 + 645 and ir.summary()["macs"] == 13824 + 640


def _conv_bn(cin: int, cout: int, k: int, groups: int = 1) -> int:
    """Parameters of a bias-free conv followed by BatchNorm (weight and bias per channel)."""
    return cout * (cin // groups) * k * k + 2 * cout


def _resnet_params(c: int, classes: int, width: int = 16, blocks: int = 2) -> int:
    total = _conv_bn(c, width, 3)
    cin = width
    for stage, cout in enumerate((width, 2 * width, 4 * width)):
        for b in range(blocks):
            total += _conv_bn(cin, cout, 3) + _conv_bn(cout, cout, 3)
            if (stage > 0 and b == 0) or cin != cout:
                total += _conv_bn(cin, cout, 1)  # projection shortcut
            cin = cout
    return total + cin * classes + classes


@pytest.mark.parametrize(("channels", "classes"), [(3, 10), (1, 7)])
def test_resnet_parameter_count_by_hand(channels: int, classes: int) -> None:
    ir = load_ir("builtin:resnet", LoadOptions(num_classes=classes, in_channels=channels))
    assert ir.param_count() == _resnet_params(channels, classes)
    adds = [n for n in ir.gm.graph.nodes if n.op == "call_function" and n.target is operator.add]
    assert len(adds) == 6  # one residual add per block, 3 stages x 2 blocks
    # The stem conv alone: 16 maps of 32x32, each output 3x3xC MACs.
    stem = next(n for n in ir.gm.graph.nodes if n.target == "stem.0")
    assert ir.meta(stem).macs == 16 * 32 * 32 * 9 * channels


def test_mobilenet_blocks_are_depthwise_with_linear_bottlenecks() -> None:
    model = build_builtin("mobilenet", BuiltinSpec(num_classes=10))
    gm = trace_module(model)
    depthwise = [m for m in gm.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.add]
    # Residuals where stride 1 and width unchanged: the first block (16 -> 16 after the 16-wide
    # stem) and the 2nd block of the 24-, 32- and 64-wide stages; not the 64 -> 96 block.
    assert len(adds) == 4
    # A linear bottleneck: each projection BatchNorm feeds an add or the next block, never a ReLU6.
    for n in adds:
        producers = [a for a in n.args if isinstance(a, torch.fx.Node)]
        assert any(
            isinstance(gm.get_submodule(str(p.target)), nn.BatchNorm2d)
            for p in producers
            if p.op == "call_module"
        )


@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
@pytest.mark.parametrize(("channels", "size"), [(3, 32), (1, 28), (1, 8)])
def test_builtins_run_on_cifar_mnist_and_digits_sizes(name: str, channels: int, size: int) -> None:
    model = build_builtin(name, BuiltinSpec(num_classes=6, in_channels=channels)).eval()
    assert 100_000 <= sum(p.numel() for p in model.parameters()) <= 300_000
    x = torch.randn(3, channels, size, size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, 6) and torch.isfinite(out).all()
    torch.testing.assert_close(trace_module(model)(x), out)
