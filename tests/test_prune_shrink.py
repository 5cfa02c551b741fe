"""Physical removal: outputs equal before and after, hand-counted sizes, ONNX Runtime parity."""

from __future__ import annotations

import torch
from torch import nn

from fxsculpt.ir.constructs import Gate
from fxsculpt.ir.graph import IR
from fxsculpt.ir.verify import outputs_of
from fxsculpt.nas.dso.dead import apply_dead_structure
from fxsculpt.nas.dso.gating import fold_gates, gate_branches, gate_channels
from fxsculpt.nas.dso.shrink import shrink


def cbr(cin: int, cout: int, stride: int = 1, groups: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class ResidualNet(nn.Module):
    """Identity and projection shortcuts, a final Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 8)
        self.b1 = nn.Sequential(cbr(8, 8), nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8))
        self.b2 = nn.Sequential(
            cbr(8, 12, stride=2), nn.Conv2d(12, 12, 3, 1, 1, bias=False), nn.BatchNorm2d(12)
        )
        self.proj = nn.Sequential(nn.Conv2d(8, 12, 1, 2, bias=False), nn.BatchNorm2d(12))
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.b1(x))
        x = torch.relu(self.b2(x) + self.proj(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class ConcatDepthwiseNet(nn.Module):
    """Depthwise branch and 1x1 branch concatenated, squeeze-excite multiply, grouped conv, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 8)
        self.dw = cbr(8, 8, groups=8)
        self.dw_pw = nn.Sequential(nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6))
        self.pw = cbr(8, 6, k=1)
        self.se_reduce = nn.Conv2d(12, 4, 1)
        self.se_expand = nn.Conv2d(4, 12, 1)
        self.grouped = cbr(12, 12, groups=3)
        self.head = cbr(12, 10, k=1)
        self.fc = nn.Linear(10 * 4, 5)

    def forward(self, x):
        a = self.stem(x)
        y = torch.cat([self.dw_pw(self.dw(a)), self.pw(a)], dim=1)
        s = torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        y = self.grouped(y * s)
        y = nn.functional.adaptive_avg_pool2d(self.head(y), 2)
        return self.fc(torch.flatten(y, 1))


def randomize(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)


def zero_some_scales(ir: IR, seed: int, p: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in ir.gm.modules():
        if isinstance(m, Gate):
            keep = (torch.rand(m.lam.shape, generator=g) > p).float()
            m.lam.data.copy_(keep * (0.2 + torch.rand(m.lam.shape, generator=g)))


def gated(model: nn.Module, shape: tuple[int, ...]) -> IR:
    ir = IR.from_module(model.eval(), shape)
    gate_branches(ir)
    gate_channels(ir)
    return ir


def check_exact_shrink(model: nn.Module, shape: tuple[int, ...], seed: int) -> IR:
    torch.manual_seed(seed)
    randomize(model, seed)
    ir = gated(model, shape)
    zero_some_scales(ir, seed)
    apply_dead_structure(ir)
    x = torch.randn(4, *shape[1:], generator=torch.Generator().manual_seed(seed))
    expected = outputs_of(ir.gm, x)[0]
    params, macs = ir.param_count(), ir.mac_count()
    shrink(ir)
    assert torch.allclose(outputs_of(ir.gm, x)[0], expected, atol=1e-5)
    assert ir.param_count() < params and ir.mac_count() < macs
    fold_gates(ir)
    assert torch.allclose(outputs_of(ir.gm, x)[0], expected, atol=1e-5)
    return ir


def test_residual_channels_share_one_gate_across_the_add():
    ir = gated(ResidualNet(), (1, 3, 8, 8))
    calls: dict[str, int] = {}
    for n in ir.construct_nodes(Gate):
        calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    # stem and b1's last conv feed one residual stream: one gate module called at both.
    assert max(calls.values()) == 2


def test_shrink_is_exact_on_residual_adds_and_final_linear():
    for seed in range(3):
        ir = check_exact_shrink(ResidualNet(), (1, 3, 8, 8), seed)
        fc = ir.gm.get_submodule("fc")
        assert fc.out_features == 5  # the classifier's outputs are pinned


def test_shrink_is_exact_on_concat_depthwise_squeeze_excite_and_grouped_convs():
    for seed in range(3):
        check_exact_shrink(ConcatDepthwiseNet(), (1, 3, 8, 8), seed)


class GroupedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.g1 = Gate(groups=8, channels=8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.g2 = Gate(groups=8, channels=8)
        self.conv3 = nn.Conv2d(8, 4, 1, bias=False)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.g1(self.bn1(self.conv1(x))))
        x = torch.relu(self.g2(self.bn2(self.conv2(x))))
        return self.fc(self.conv3(x).mean((2, 3)))


def test_a_dead_group_leaves_the_grouped_conv_and_the_layers_around_it():
    model = GroupedNet()
    randomize(model, 0)
    ir = IR.from_module(model.eval(), (1, 3, 6, 6))
    ir.gm.get_submodule("g1").lam.data[:4] = 0.0  # group 0 of conv2's input
    ir.gm.get_submodule("g2").lam.data[:4] = 0.0  # group 0 of conv2's output
    ir.gm.get_submodule("g2").lam.data[5] = 0.0  # one channel of group 1: goes once conv2 is ungrouped
    x = torch.randn(2, 3, 6, 6)
    expected = outputs_of(ir.gm, x)[0]
    shrink(ir)
    assert torch.allclose(outputs_of(ir.gm, x)[0], expected, atol=1e-6)
    conv1, conv2, conv3 = (ir.gm.get_submodule(n) for n in ("conv1", "conv2", "conv3"))
    # Group 0 goes whole (input and output halves); conv2 is then an ordinary conv with one group,
    # so its zero output channel 5 can go alone on the next round, and conv3 stops reading it.
    assert (conv1.out_channels, conv2.in_channels, conv2.groups, conv2.out_channels) == (4, 4, 1, 3)
    assert conv3.in_channels == 3


class HandNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.gate = Gate(groups=8, channels=8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = torch.relu(self.gate(self.bn1(self.conv1(x))))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_params_and_macs_after_pruning_equal_a_hand_count():
    ir = IR.from_module(HandNet().eval(), (1, 3, 8, 8))
    ir.gm.get_submodule("gate").lam.data[[1, 4, 6]] = 0.0
    shrink(ir)
    # conv1 3->5 k3, BN(5), conv2 5->6 k3, BN(6), Linear 6->5 with bias; 8x8 maps (padding 1).
    assert ir.param_count() == 5 * 3 * 9 + 2 * 5 + 6 * 5 * 9 + 2 * 6 + 6 * 5 + 5
    assert ir.mac_count() == 8 * 8 * 5 * (3 * 9) + 8 * 8 * 6 * (5 * 9) + 5 * 6


def test_pruned_model_exports_to_onnx_and_matches_onnx_runtime(tmp_path):
    from fxsculpt.passes.export import export_onnx, ort_session, run_onnx

    ir = check_exact_shrink(ConcatDepthwiseNet(), (1, 3, 8, 8), seed=1)
    path = tmp_path / "pruned.onnx"
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    export_onnx(ir.gm.eval(), x[:1], path)
    got = run_onnx(ort_session(path), x.numpy())
    expected = outputs_of(ir.gm, x)[0].numpy()
    assert got.shape == expected.shape
    assert abs(got - expected).max() < 1e-4


class PositionEmbeddingNet(nn.Module):
    """A ViT-style stem: patch conv plus a learned position embedding, then one residual block."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 2, 2)
        self.pos = nn.Parameter(torch.randn(1, 8, 4, 4))
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU())
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.patch(x) + self.pos
        x = x + self.block(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_a_parameter_added_to_the_input_path_is_not_a_residual_branch():
    ir = IR.from_module(PositionEmbeddingNet().eval(), (1, 3, 8, 8))
    names = gate_branches(ir)
    # Hand count: only `x + block(x)` adds two input-dependent tensors; gating the patch conv
    # would let the search cut the input off and leave the (batch-1) position embedding.
    assert len(names) == 1
    gate = next(iter(ir.construct_nodes(Gate)))
    assert gate.args[0].target == "block.1"


def test_a_zero_branch_beside_a_parameter_keeps_the_batch():
    model = PositionEmbeddingNet().eval()
    ir = IR.from_module(model, (1, 3, 8, 8))
    graph = ir.gm.graph
    patch = next(n for n in graph.nodes if n.target == "patch")
    ir.gm.add_submodule("zero_patch", Gate())
    ir.gm.get_submodule("zero_patch").lam.data.zero_()
    with graph.inserting_after(patch):
        gate = graph.call_module("zero_patch", (patch,))
    patch.replace_all_uses_with(gate, delete_user_cb=lambda user: user is not gate)
    ir.gm.recompile()
    ir.propagate()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = outputs_of(ir.gm, x)[0]
    shrink(ir)
    got = outputs_of(ir.gm, x)[0]
    # The add of a zero tensor and the position embedding is the embedding broadcast over the batch.
    assert got.shape == (3, 5)
    assert torch.allclose(got, expected, atol=1e-6)


class TokenLinearNet(nn.Module):
    """A Linear over the last axis of a 3-D tensor whose dim 1 (here 4 channels of a Conv1d) is not its input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 1)
        self.gate = Gate(groups=4, channels=4)
        self.tokens = nn.Linear(8, 6)
        self.fc = nn.Linear(4 * 6, 5)

    def forward(self, x):
        y = self.tokens(torch.relu(self.gate(self.conv(x))))
        return self.fc(torch.flatten(y, 1))


def test_zero_masks_of_another_axis_say_nothing_about_a_linear():
    from fxsculpt.nas.dso.channels import analyze

    model = TokenLinearNet().eval()
    model.gate.lam.data.copy_(torch.tensor([0.0, 1.0, 1.0, 1.0]))
    ir = IR.from_module(model, (1, 3, 8))
    ana = analyze(ir)  # a 4-entry mask reaching a Linear with 8 input features
    by_target = {str(n.target): n for n in ir.gm.graph.nodes if n.op == "call_module"}
    assert ana.zero[by_target["gate"]].tolist() == [True, False, False, False]
    # the Linear's bias makes channel 0 of its output nonzero: no mask may claim otherwise
    assert not bool(ana.zero.get(by_target["tokens"], torch.zeros(4, dtype=torch.bool)).any())
