"""HAQ's action-to-bits mapping (Wang et al. 2019, §3.2) at its edges, checked against the formula."""

from __future__ import annotations

import math

import pytest

from fxsculpt.quant.haq.actions import BitLevels


def formula(a: float, b_min: int, b_max: int) -> int:
    """The paper's b = round(b_min − 0.5 + a·(b_max − b_min + 1)), halves rounded up, clamped to b_max."""
    return min(math.floor(b_min - 0.5 + a * (b_max - b_min + 1) + 0.5), b_max)


def test_edges_of_the_action_range() -> None:
    levels = BitLevels(2, 8)
    assert levels.to_bits(0.0) == 2
    assert levels.to_bits(1.0) == 8
    # out-of-range actions are clipped, never extrapolated
    assert levels.to_bits(-0.3) == 2
    assert levels.to_bits(1.7) == 8


def test_every_level_owns_an_equal_slice() -> None:
    levels = BitLevels(2, 8)
    width = 1 / 7
    for k, bits in enumerate(range(2, 9)):
        lo, hi = k * width, (k + 1) * width
        assert levels.to_bits(lo + 1e-9) == bits
        assert levels.to_bits(hi - 1e-9) == bits
    for a in [i / 997 for i in range(998)]:
        assert levels.to_bits(a) == formula(a, 2, 8)


def test_float_level_sits_above_b_max() -> None:
    levels = BitLevels(2, 8, with_float=True)
    assert levels.levels == [2, 3, 4, 5, 6, 7, 8, None]
    assert levels.to_bits(1.0) is None
    assert levels.to_bits(7 / 8 + 1e-9) is None
    assert levels.to_bits(7 / 8 - 1e-9) == 8
    assert levels.to_bits(0.0) == 2
    assert levels.lower(None) == 8
    assert levels.lower(2) == 2


@pytest.mark.parametrize("bits", [2, 3, 5, 8, None])
def test_action_round_trip(bits: int | None) -> None:
    levels = BitLevels(2, 8, with_float=True)
    assert levels.to_bits(levels.to_action(bits)) == bits


def test_bad_ranges_are_refused() -> None:
    with pytest.raises(ValueError):
        BitLevels(5, 4)
    with pytest.raises(ValueError):
        BitLevels(2, 8).index(None)
