"""HAQ's per-layer observation (§3.1): columns from real layers, min-max normalized per column."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

from fxsculpt.quant.haq.state import COLUMNS, LayerInfo, StateSpace, describe_layer, minmax_normalize


def test_describe_conv_linear_and_depthwise() -> None:
    conv = describe_layer("c", nn.Conv2d(3, 16, 3, stride=2, padding=1), (1, 3, 32, 32), macs=0)
    assert (conv.in_channels, conv.out_channels, conv.kernel, conv.stride) == (3, 16, 3, 2)
    assert conv.feature_map == 32 * 32
    assert conv.params == 3 * 16 * 9 + 16
    assert not conv.depthwise
    dw = describe_layer("d", nn.Conv2d(8, 8, 3, groups=8, bias=False), (1, 8, 16, 16), macs=0)
    assert dw.depthwise and dw.params == 8 * 9
    fc = describe_layer("f", nn.Linear(64, 10), (1, 64), macs=640)
    assert (fc.kind, fc.in_channels, fc.out_channels, fc.params) == ("linear", 64, 10, 650)
    with pytest.raises(TypeError):
        describe_layer("r", nn.ReLU(), (1, 3), 0)


def test_minmax_normalization_matches_hand_computation() -> None:
    table = np.array([[1.0, 10.0, 5.0], [3.0, 30.0, 5.0], [2.0, 20.0, 5.0]])
    out = minmax_normalize(table)
    expected = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    np.testing.assert_allclose(out, expected)


def _layer(i: int, cin: int, cout: int, params: int, dw: bool = False) -> LayerInfo:
    return LayerInfo(f"l{i}", "conv", cin, cout, 3, 1 + i % 2, 64 // (i + 1), params, 0, dw)


def test_observations_are_normalized_and_carry_step_flags() -> None:
    layers = [_layer(0, 3, 16, 432), _layer(1, 16, 16, 144, True), _layer(2, 16, 64, 1024)]
    space = StateSpace(layers, two_steps=True)
    assert space.steps == 6 and space.dim == len(COLUMNS)
    rows = np.array([space.observation(s, 0.25) for s in range(space.steps)])
    assert rows.min() >= 0.0 and rows.max() <= 1.0
    # the params column: (432, 144, 1024) → ((432-144)/880, 0, 1)
    params_col = COLUMNS.index("params")
    np.testing.assert_allclose(rows[::2, params_col], [(432 - 144) / 880, 0.0, 1.0], rtol=1e-6)
    # weight step then activation step, and the previous action is passed through
    flag = COLUMNS.index("is_weight")
    assert list(rows[:, flag]) == [1, 0, 1, 0, 1, 0]
    assert np.all(rows[:, COLUMNS.index("prev_action")] == np.float32(0.25))
    # layer index normalized over 3 layers
    np.testing.assert_allclose(rows[::2, COLUMNS.index("index")], [0.0, 0.5, 1.0])
    assert space.layer_of(3) == (1, False)
    single = StateSpace(layers, two_steps=False)
    assert single.steps == 3 and single.layer_of(2) == (2, True)
