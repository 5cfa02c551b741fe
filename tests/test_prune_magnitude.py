"""The L1-norm filter baseline and the adaptive-FLOPs γ, against hand computations."""

from __future__ import annotations

import torch
from torch import nn

from fxsculpt.ir.graph import IR
from fxsculpt.nas.dso.blocks import DSOSupernet
from fxsculpt.nas.dso.magnitude import l1_filter_scores, magnitude_prune_to_macs
from fxsculpt.nas.dso.search import adaptive_gammas


class TwoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 3, 1, bias=False)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(self.conv2(x).mean((2, 3)))


def two_conv_ir() -> IR:
    model = TwoConv().eval()
    with torch.no_grad():
        # Filter j of conv1 has |w| = (j+1) * [1, 3] -> mean |w| = 2 (j+1); filter 2 is the largest.
        model.conv1.weight.copy_(
            torch.tensor([[1.0, -3.0], [2.0, 6.0], [-30.0, 90.0], [4.0, -12.0]]).reshape(4, 2, 1, 1)
        )
        model.conv2.weight.fill_(100.0)  # conv2's filters rank after every filter of conv1
    return IR.from_module(model, (1, 2, 4, 4))


def test_filters_are_ranked_by_mean_absolute_weight_relative_to_their_layer():
    from fxsculpt.nas.dso.gating import gate_channels

    ir = two_conv_ir()
    gate_channels(ir)
    conv1_gate = next(str(n.target) for n in ir.construct_nodes() if n.args[0].target == "bn1")
    scores = [s for s in l1_filter_scores(ir) if s.gate == conv1_gate]
    assert [s.index for s in scores] == [0, 1, 3, 2]
    # Scores are relative to the layer's mean filter score, (2 + 4 + 60 + 8) / 4 = 18.5.
    assert [round(s.score, 6) for s in scores] == [round(v / 18.5, 6) for v in (2.0, 4.0, 8.0, 60.0)]


def test_magnitude_pruning_meets_the_mac_target_removing_the_smallest_filters():
    ir = two_conv_ir()
    # 4x4 maps: conv1 16·4·2 = 128 MACs, conv2 16·3·4 = 192, fc 6. Dropping k filters of conv1
    # saves 16·2 + 16·3 = 80 MACs each: a target of 326 - 2·80 = 166 removes exactly two.
    pruned = magnitude_prune_to_macs(ir, 166)
    assert pruned.mac_count() == 166
    kept = pruned.gm.get_submodule("conv1").weight.detach().reshape(2, 2)
    assert torch.equal(kept, torch.tensor([[-30.0, 90.0], [4.0, -12.0]]))


def test_magnitude_pruning_never_empties_a_layer():
    ir = two_conv_ir()
    pruned = magnitude_prune_to_macs(ir, 0)  # an impossible target: as small as allowed
    # Each gated layer keeps its best filter: conv1's filter 2 and one of conv2's three.
    assert pruned.gm.get_submodule("conv1").out_channels == 1
    assert pruned.gm.get_submodule("conv2").out_channels == 1
    assert torch.equal(
        pruned.gm.get_submodule("conv1").weight.detach().flatten(), torch.tensor([-30.0, 90.0])
    )


def test_adaptive_gamma_scales_each_block_by_its_share_of_the_macs():
    torch.manual_seed(0)
    model = DSOSupernet(width=4, stages=2, blocks=1, levels=1, ops=("sep_conv_3x3", "max_pool_3x3")).eval()
    ir = IR.from_module(model, (1, 3, 8, 8), 10)
    gammas = adaptive_gammas(ir, 0.01)

    # Gates live in cells.0 (8x8, 4 ch) and cells.2 (4x4, 8 ch); cells.1 is the reduction block.
    macs = {}
    for name in ("cells.0", "cells.2"):
        block = model.get_submodule(name)
        counter = {"n": 0}

        def hook(m, _i, out, counter=counter):
            counter["n"] += out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

        hs = [m.register_forward_hook(hook) for m in block.modules() if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            model(torch.zeros(1, 3, 8, 8))
        for h in hs:
            h.remove()
        macs[name] = counter["n"]
    mean = (macs["cells.0"] + macs["cells.2"]) / 2
    assert abs(gammas["cells.0.edges.0"] - 0.01 * macs["cells.0"] / mean) < 1e-12
    assert abs(gammas["cells.2.out_gates.1"] - 0.01 * macs["cells.2"] / mean) < 1e-12
