"""Dead-structure propagation on hand-made gate patterns (DSO-NAS section 3.4)."""

from __future__ import annotations

import torch

from fxsculpt.ir.graph import IR
from fxsculpt.ir.verify import outputs_of
from fxsculpt.nas.dso.blocks import DSOBlock
from fxsculpt.nas.dso.dead import DeadGraph, apply_dead_structure, propagate_dead
from fxsculpt.nas.dso.shrink import shrink


def graph(edges: list[tuple[str, str]], scales: dict[str, float]) -> DeadGraph:
    g = DeadGraph()
    for name, scale in scales.items():
        g.add_node(name, scale)
    for src, dst in edges:
        g.add_edge(src, dst)
    g.sources.add("in")
    g.sinks.add("out")
    return g


def test_an_op_whose_every_input_scale_is_zero_dies_and_kills_its_outgoing_gate():
    # in -g1(0)-> A -g2(0.5)-> B -> out ;  in -g3(1)-> B
    g = graph(
        [("in", "g1"), ("g1", "A"), ("A", "g2"), ("g2", "B"), ("in", "g3"), ("g3", "B"), ("B", "out")],
        {"g1": 0.0, "g2": 0.5, "g3": 1.0},
    )
    assert propagate_dead(g) == {"g1", "A", "g2"}


def test_an_op_whose_every_output_scale_is_zero_dies_and_kills_its_incoming_gate():
    # in -g1(1)-> A -g2(0)-> B -> out ;  in -g3(1)-> B
    g = graph(
        [("in", "g1"), ("g1", "A"), ("A", "g2"), ("g2", "B"), ("in", "g3"), ("g3", "B"), ("B", "out")],
        {"g1": 1.0, "g2": 0.0, "g3": 1.0},
    )
    assert propagate_dead(g) == {"g2", "A", "g1"}


def test_an_op_with_one_live_consumer_stays():
    # A feeds B through g2 (0) and C through g4 (0.3); C reaches the output.
    g = graph(
        [
            ("in", "g1"),
            ("g1", "A"),
            ("A", "g2"),
            ("g2", "B"),
            ("A", "g4"),
            ("g4", "C"),
            ("in", "g3"),
            ("g3", "B"),
            ("B", "out"),
            ("C", "out"),
        ],
        {"g1": 1.0, "g2": 0.0, "g3": 1.0, "g4": 0.3},
    )
    assert propagate_dead(g) == {"g2"}


def test_death_cascades_through_levels():
    # Level 0: a0 (input gate 0), a1. Level 1: b0 fed by in (0), a0 (1), a1 (0): all of its
    # inputs are dead, so b0 dies although its edge from a0 has scale 1; then b0's output gate.
    edges = [
        ("in", "e_in_a0"),
        ("e_in_a0", "a0"),
        ("in", "e_in_a1"),
        ("e_in_a1", "a1"),
        ("in", "e_in_b0"),
        ("e_in_b0", "b0"),
        ("a0", "e_a0_b0"),
        ("e_a0_b0", "b0"),
        ("a1", "e_a1_b0"),
        ("e_a1_b0", "b0"),
        ("a0", "o_a0"),
        ("o_a0", "sum"),
        ("a1", "o_a1"),
        ("o_a1", "sum"),
        ("b0", "o_b0"),
        ("o_b0", "sum"),
        ("sum", "out"),
    ]
    scales = {
        "e_in_a0": 0.0,
        "e_in_a1": 1.0,
        "e_in_b0": 0.0,
        "e_a0_b0": 1.0,
        "e_a1_b0": 0.0,
        "o_a0": 1.0,
        "o_a1": 1.0,
        "o_b0": 1.0,
    }
    dead = propagate_dead(graph(edges, scales))
    assert dead == {"e_in_a0", "a0", "e_a0_b0", "o_a0", "e_in_b0", "e_a1_b0", "b0", "o_b0"}


def _block_ir() -> tuple[IR, DSOBlock]:
    torch.manual_seed(0)
    block = DSOBlock(4, levels=2, ops=("sep_conv_3x3", "max_pool_3x3")).eval()
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-1, 1)
    return IR.from_module(block, (1, 4, 6, 6)), block


def test_dead_structure_on_a_dso_block_zeroes_the_hand_expected_gates_and_shrinks_exactly():
    ir, _ = _block_ir()
    gm = ir.gm
    # Edge order: op0 <- in; op1 <- in; op2 <- in, op0, op1; op3 <- in, op0, op1.
    for k in (0, 2, 4):  # in->op0, in->op2, op1->op2
        gm.get_submodule(f"edges.{k}").lam.data.zero_()
    report = apply_dead_structure(ir)
    # op0 has no input: its edges to op2 and op3 and its output gate go. op2 then has only the
    # dead op0 as input: it dies and its output gate goes.
    assert set(report.zeroed_gates) == {"edges.3", "edges.6", "out_gates.0", "out_gates.2"}
    x = torch.randn(3, 4, 6, 6)
    expected = outputs_of(ir.gm, x)[0]
    params_before = ir.param_count()
    shrink(ir)
    got = outputs_of(ir.gm, x)[0]
    assert torch.allclose(got, expected, atol=1e-6)
    targets = {str(n.target) for n in ir.gm.graph.nodes if n.op == "call_module"}
    assert not any(t.startswith(("ops.0.", "ops.2.", "out_convs.0", "out_convs.2")) for t in targets)
    # Removed: op0 and op2 (sep convs: depthwise 4·9 + pointwise 16 + BN 8 each) and two 1x1 convs.
    assert params_before - ir.param_count() == 2 * (4 * 9 + 16 + 8) + 2 * 16
