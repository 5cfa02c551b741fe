"""DARTS building blocks against independent references: hand sums, hand-set α, published counts."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fxsculpt.ir.graph import IR
from fxsculpt.nas.darts.discretize import genotype_of
from fxsculpt.nas.darts.genotype import DARTS_V2, derive_genotype, load_genotype
from fxsculpt.nas.darts.mixed import MixedOp
from fxsculpt.nas.darts.ops import PRIMITIVES, build_op
from fxsculpt.nas.darts.relax import candidates_for, connected_without
from fxsculpt.nas.darts.supernet import SearchNetwork
from fxsculpt.passes.darts import torch_threads


@pytest.fixture(autouse=True)
def one_thread():
    # The shared 2-core machine runs these tiny ops many times faster on one thread.
    with torch_threads(1):
        yield


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("lean", [True, False])
def test_mixed_op_is_the_hand_weighted_sum(stride: int, lean: bool) -> None:
    torch.manual_seed(0)
    ops = [build_op(name, 4, 4, stride, search=True) for name in PRIMITIVES]
    mixed = MixedOp(ops, PRIMITIVES, lean=lean)
    alpha = [0.3, -1.0, 0.5, 2.0, -0.2, 0.1, 1.1, -0.7]
    with torch.no_grad():
        mixed.alpha.copy_(torch.tensor(alpha))
    x = torch.randn(3, 4, 8, 8)
    # softmax by hand, in float64 from the Python list
    exp = [math.exp(a) for a in alpha]
    weights = [e / sum(exp) for e in exp]
    expected = torch.zeros(3, 4, 8 // stride, 8 // stride, dtype=torch.float64)
    for w, op in zip(weights, ops):
        expected += w * op(x).double()  # each op on its own, with its own ReLU
    got = mixed(x).double()
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5)
    # the zero op really contributes nothing
    assert float(ops[0](x).abs().max()) == 0.0


def test_mixed_op_gradient_wrt_alpha_matches_eq2() -> None:
    """d out / d α_k = p_k (o_k - Σ_j p_j o_j): the softmax Jacobian, computed by hand."""
    torch.manual_seed(1)
    names = ["none", "skip_connect", "avg_pool_3x3", "sep_conv_3x3"]
    ops = [build_op(n, 2, 2, 1, search=True) for n in names]
    for op in ops:
        op.eval()
    mixed = MixedOp(ops, names)
    x = torch.randn(2, 2, 5, 5)
    outs = [op(x).detach() for op in ops]
    outs[0] = torch.zeros_like(outs[1])
    p = torch.softmax(mixed.alpha.detach(), 0)
    mean = sum(pk * o for pk, o in zip(p, outs))
    mixed(x).sum().backward()
    for k in range(len(names)):
        expected = float((p[k] * (outs[k] - mean)).sum())
        assert mixed.alpha.grad[k].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_candidate_filter_follows_shapes_and_strides() -> None:
    conv = nn.Conv2d(8, 8, 3, padding=1)
    _, names = candidates_for(conv, (1, 8, 8, 8), (1, 8, 8, 8), PRIMITIVES, allow_none=True)
    assert names == list(PRIMITIVES)
    _, names = candidates_for(conv, (1, 8, 8, 8), (1, 8, 8, 8), PRIMITIVES, allow_none=False)
    assert names == [n for n in PRIMITIVES if n != "none"]
    # more channels: pooling and identity cannot produce them
    widen = nn.Conv2d(8, 16, 3, padding=1)
    _, names = candidates_for(widen, (1, 8, 8, 8), (1, 16, 8, 8), PRIMITIVES, allow_none=False)
    assert names == ["sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]
    # stride 2 with a channel change: the factorized-reduce skip fits, pooling does not
    down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    _, names = candidates_for(down, (1, 8, 9, 9), (1, 16, 5, 5), PRIMITIVES, allow_none=False)
    assert names == ["skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]
    # stride 2, same channels, odd size: everything but the zero op
    down_same = nn.Conv2d(8, 8, 3, stride=2, padding=1)
    _, names = candidates_for(down_same, (1, 8, 7, 7), (1, 8, 4, 4), PRIMITIVES, allow_none=False)
    assert names == [n for n in PRIMITIVES if n != "none"]
    # an unpadded conv shrinks the map: no DARTS op produces 6x6 from 8x8
    valid = nn.Conv2d(8, 8, 3)
    ops, names = candidates_for(valid, (1, 8, 8, 8), (1, 8, 6, 6), PRIMITIVES, allow_none=True)
    assert ops == [] and names == []
    # odd channel count at stride 2: the factorized reduce needs an even one
    odd = nn.Conv2d(8, 7, 3, stride=2, padding=1)
    _, names = candidates_for(odd, (1, 8, 8, 8), (1, 7, 4, 4), PRIMITIVES, allow_none=False)
    assert "skip_connect" not in names and "sep_conv_3x3" in names


class _Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return h + self.b(h)


def test_none_only_where_the_graph_stays_connected() -> None:
    ir = IR.from_module(_Chain(), (1, 3, 8, 8))
    nodes = {n.name: n for n in ir.gm.graph.nodes}
    assert not connected_without(ir.gm.graph, nodes["a"])  # the only way from input to output
    assert connected_without(ir.gm.graph, nodes["b"])  # a residual branch beside the identity


def _hand_alphas(steps: int) -> list[torch.Tensor]:
    """α for a cell whose raw-α ranking and softmax ranking of node 1's edges disagree."""
    idx = {n: i for i, n in enumerate(PRIMITIVES)}
    rows = []
    # node 0, edge from state 0: 'none' is largest, avg_pool the strongest other op
    r = torch.zeros(8)
    r[idx["none"]], r[idx["avg_pool_3x3"]] = 4.0, 1.0
    rows.append(r)
    r = torch.zeros(8)  # node 0, edge from state 1
    r[idx["sep_conv_5x5"]] = 0.7
    rows.append(r)
    # node 1, edge from state 0: large raw α everywhere, one slightly larger: softmax 0.19
    r = torch.full((8,), 5.0)
    r[idx["sep_conv_3x3"]] = 5.5
    rows.append(r)
    r = torch.zeros(8)  # node 1, edge from state 1: softmax 0.51
    r[idx["dil_conv_3x3"]] = 2.0
    rows.append(r)
    r = torch.zeros(8)  # node 1, edge from state 2: softmax 0.28
    r[idx["max_pool_3x3"]] = 1.0
    rows.append(r)
    assert len(rows) == sum(2 + k for k in range(steps))
    return rows


def test_hand_softmax_values_behind_the_expectations() -> None:
    """The arithmetic (plain Python floats) the hand-derived genotypes below rest on."""
    avg = math.e / (math.exp(4) + math.e + 6)  # node 0, state 0: avg_pool (none excluded)
    sep5 = math.exp(0.7) / (7 + math.exp(0.7))  # node 0, state 1: sep_conv_5x5
    a = math.exp(5.5) / (7 * math.exp(5) + math.exp(5.5))  # node 1, state 0: sep_conv_3x3
    b = math.exp(2) / (7 + math.exp(2))  # node 1, state 1: dil_conv_3x3
    c = math.e / (7 + math.e)  # node 1, state 2: max_pool_3x3
    assert sep5 > avg
    assert b > c > a  # softmax keeps states 1 and 2 at node 1 ...
    assert 5.5 > 2.0 > 1.0  # ... raw α would keep states 0 and 1
    assert sep5 > a  # reversed rows (reduce cell below): state 1 before state 0 at node 1


def test_genotype_from_softmax_not_raw_alpha() -> None:
    rows = _hand_alphas(2)
    genotype = derive_genotype(rows, rows, steps=2, multiplier=2)
    # node 0: sep_conv_5x5 from state 1 (0.22) outranks avg_pool from state 0 (e/(e^4+e+6) = 0.04)
    expected = [("sep_conv_5x5", 1), ("avg_pool_3x3", 0), ("dil_conv_3x3", 1), ("max_pool_3x3", 2)]
    assert genotype.normal == expected
    assert genotype.reduce == expected
    assert genotype.normal_concat == [2, 3]
    # the raw-α ranking (the port bug) would keep state 0's sep_conv_3x3 at node 1
    raw_node1 = sorted(range(3), key=lambda j: -max(float(rows[2 + j][k]) for k in range(1, 8)))[:2]
    assert raw_node1 == [0, 1]
    assert [j for _, j in genotype.normal[2:]] == [1, 2]


def test_supernet_genotype_uses_tied_alpha_softmax() -> None:
    torch.manual_seed(0)
    net = SearchNetwork(num_classes=3, in_channels=3, channels=4, layers=3, steps=2, multiplier=2)
    rows = _hand_alphas(2)
    with torch.no_grad():
        for alpha, row in zip(net._alphas["normal"], rows):
            alpha.copy_(row)
        for alpha, row in zip(net._alphas["reduce"], reversed(rows)):
            alpha.copy_(row)
    ir = IR.from_module(net, (1, 3, 8, 8), 3)
    genotype = genotype_of(ir)
    assert genotype is not None
    assert genotype.normal == [
        ("sep_conv_5x5", 1),
        ("avg_pool_3x3", 0),
        ("dil_conv_3x3", 1),
        ("max_pool_3x3", 2),
    ]
    # reduce α rows reversed: node 0 gets rows 4, 3; node 1 gets rows 2, 1, 0
    assert genotype.reduce == [
        ("dil_conv_3x3", 1),
        ("max_pool_3x3", 0),
        ("sep_conv_5x5", 1),
        ("sep_conv_3x3", 0),
    ]


def test_darts_eval_v2_parameter_count_matches_the_paper_code() -> None:
    from fxsculpt.ir.load import LoadOptions, load_ir

    ir = load_ir(
        "builtin:darts-eval",
        LoadOptions(input_shape=(1, 3, 32, 32), num_classes=10, model_options={"genotype": "DARTS_V2"}),
    )
    assert ir.summary()["params"] == 3_349_342
    assert load_genotype("DARTS_V2") == DARTS_V2


def test_darts_supernet_builtin_defaults() -> None:
    from fxsculpt.zoo import BuiltinSpec, build_builtin

    net = build_builtin("darts-supernet", BuiltinSpec())
    assert isinstance(net, SearchNetwork)
    assert len(net.cells) == 8 and [c.reduction for c in net.cells].count(True) == 2
    assert [i for i, c in enumerate(net.cells) if c.reduction] == [2, 5]
    mixed = [m for m in net.modules() if isinstance(m, MixedOp)]
    assert len(mixed) == 8 * 14
    assert len({id(m.alpha) for m in mixed}) == 2 * 14  # α tied within each cell kind
    bn = [m for m in net.cells.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn and not any(m.affine for m in bn)  # no affine BN during search
