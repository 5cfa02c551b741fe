"""Ranking λ out for a MAC budget, and the gradual budget schedule, against hand computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxsculpt.ir.constructs import Gate
from fxsculpt.ir.graph import IR
from fxsculpt.nas.dso.gating import gate_branches, gate_channels
from fxsculpt.nas.dso.ranking import budget_steps, cut_scores, meet_macs_target, relative_scores
from tests.prune_models import TwoConvBN


def gated_two_conv() -> tuple[IR, Gate, Gate]:
    torch.manual_seed(0)
    ir = IR.from_module(TwoConvBN().eval(), (1, 2, 4, 4))
    gate_channels(ir)
    gates = {str(n.args[0].target): ir.gm.get_submodule(str(n.target)) for n in ir.construct_nodes(Gate)}
    return ir, gates["bn1"], gates["bn2"]


def test_relative_score_is_lambda_times_bn_weight_over_the_gate_mean():
    ir, g1, g2 = gated_two_conv()
    with torch.no_grad():
        g1.lam.copy_(torch.tensor([0.5, 0.2, 0.4, 0.1]))
        ir.gm.get_submodule("bn1").weight.copy_(torch.tensor([1.0, 4.0, -1.0, 2.0]))
        g2.lam.copy_(torch.tensor([3.0, 3.0, 3.0]))
        ir.gm.get_submodule("bn2").weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
    scores = {(s.gate, s.index): s.score for s in relative_scores(ir)}
    # conv1's gate: effective λ·|w| = [0.5, 0.8, 0.4, 0.2], mean 0.475.
    name1 = next(n for n, m in ir.gm.named_modules() if m is g1)
    for i, eff in enumerate((0.5, 0.8, 0.4, 0.2)):
        assert scores[(name1, i)] == pytest.approx(eff / 0.475)
    # conv2's gate: [3, 6, 9], mean 6: the raw λ are equal, the BN weights decide.
    name2 = next(n for n, m in ir.gm.named_modules() if m is g2)
    assert [scores[(name2, i)] for i in range(3)] == pytest.approx([0.5, 1.0, 1.5])


def test_relative_cut_removes_the_channel_with_the_smallest_effective_scale():
    ir, g1, _ = gated_two_conv()
    with torch.no_grad():
        # Raw λ would remove channel 3 (0.1); with BN weights the effective scales are
        # [0.5, 0.1, 0.4, 0.3]: channel 1 is the one to go.
        g1.lam.copy_(torch.tensor([0.5, 0.2, 0.4, 0.1]))
        ir.gm.get_submodule("bn1").weight.copy_(torch.tensor([1.0, 0.5, 1.0, 3.0]))
    # 4x4 maps: conv1 16·2·4 = 128 MACs, conv2 16·4·3 = 192, fc 6 (BN and gates count 0 here);
    # one conv1 channel is 16·2 + 16·3 = 80 MACs.
    full = ir.mac_count()
    kept_before = ir.gm.get_submodule("conv1").weight.detach().clone()
    assert meet_macs_target(ir, full - 80, "relative") == 1
    assert ir.mac_count() == full - 80
    kept = ir.gm.get_submodule("conv1").weight.detach()
    assert torch.equal(kept, kept_before[[0, 2, 3]])


def test_lambda_cut_ranks_raw_values_globally():
    ir, g1, g2 = gated_two_conv()
    with torch.no_grad():
        g1.lam.copy_(torch.tensor([0.5, 0.2, 0.4, 0.1]))
        g2.lam.copy_(torch.tensor([0.05, 0.9, 0.9]))
    order = [(s.gate, s.index) for s in cut_scores(ir, "lambda")]
    name1 = next(n for n, m in ir.gm.named_modules() if m is g1)
    name2 = next(n for n, m in ir.gm.named_modules() if m is g2)
    # Each gate keeps its largest entry (10%, at least one): conv1's 0.5 and one of conv2's 0.9.
    assert order[:4] == [(name2, 0), (name1, 3), (name1, 1), (name1, 2)]
    assert len(order) == 5


def test_scalar_gates_are_scored_against_the_mean_of_the_scalar_gates():
    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 3, 3, padding=1, bias=False)
            self.b = nn.Conv2d(3, 3, 3, padding=1, bias=False)

        def forward(self, x):
            x = x + self.a(x)
            return x + self.b(x)

    ir = IR.from_module(Res().eval(), (1, 3, 4, 4))
    names = gate_branches(ir)
    with torch.no_grad():
        ir.gm.get_submodule(names[0]).lam.fill_(0.2)
        ir.gm.get_submodule(names[1]).lam.fill_(0.6)
    scores = {s.gate: s.score for s in relative_scores(ir)}
    assert scores[names[0]] == pytest.approx(0.5) and scores[names[1]] == pytest.approx(1.5)


def test_scalar_gates_are_not_ranked_next_to_channel_gates():
    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 3, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(3)
            self.b = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.bn_b = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = x + self.bn(self.a(x))
            return self.fc(torch.relu(self.bn_b(self.b(x))).mean((2, 3)))

    ir = IR.from_module(Res().eval(), (1, 3, 4, 4))
    branches = gate_branches(ir)
    channels = gate_channels(ir)
    assert branches and channels
    with torch.no_grad():
        ir.gm.get_submodule(branches[0]).lam.fill_(0.01)  # tiny, but not comparable with channels
    ranked = {s.gate for s in relative_scores(ir)}
    assert ranked == set(channels)


def test_budget_steps_spread_the_cuts_before_the_last_stretch():
    # 4 cuts over 10 steps: after steps 2, 4, 6, 8 (i/5 of the way), a quarter of the budget each.
    assert budget_steps(10, 4) == {2: 0.25, 4: 0.5, 6: 0.75, 8: 1.0}
    assert budget_steps(10, 0) == {}
    # More cuts than steps: round(2·i/5) = 0 (at least 1), 1, 1, 2; on a shared step the
    # tightest cut counts.
    assert budget_steps(2, 4) == {1: 0.75, 2: 1.0}
