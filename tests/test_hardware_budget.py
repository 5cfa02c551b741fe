"""Budget parsing: every unit, the KB/KiB distinction, and one-line errors for bad spellings."""

from __future__ import annotations

import pytest

from fxsculpt.hardware.budget import Budget, parse_budget
from fxsculpt.ir.errors import BadInputError


def test_full_budget_from_the_issue() -> None:
    budget = parse_budget("latency=4ms,size=500KB,bitops=1G,params=1M,accuracy_drop=1%")
    assert budget.latency_ms == pytest.approx(4.0)
    assert budget.size_bytes == 500_000
    assert budget.bitops == 1e9
    assert budget.params == 1e6
    assert budget.accuracy_drop == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("text", "field", "expected"),
    [
        ("latency=500us", "latency_ms", 0.5),
        ("latency=250µs", "latency_ms", 0.25),
        ("latency=0.01s", "latency_ms", 10.0),
        ("latency=2.5ms", "latency_ms", 2.5),
        ("size=1KiB", "size_bytes", 1024),
        ("size=2MiB", "size_bytes", 2 * 1024 * 1024),
        ("size=3MB", "size_bytes", 3_000_000),
        ("size=1GB", "size_bytes", 1e9),
        ("size=1GiB", "size_bytes", 1024**3),
        ("size=123B", "size_bytes", 123),
        ("bitops=250M", "bitops", 250e6),
        ("bitops=5e8", "bitops", 5e8),
        ("params=300K", "params", 300e3),
        ("params=300k", "params", 300e3),
        ("params=250000", "params", 250_000),
        ("params=1T", "params", 1e12),
        ("accuracy_drop=0.5%", "accuracy_drop", 0.005),
    ],
)
def test_units(text: str, field: str, expected: float) -> None:
    assert getattr(parse_budget(text), field) == pytest.approx(expected)


def test_subset_leaves_the_rest_unconstrained_and_spaces_are_allowed() -> None:
    budget = parse_budget(" size = 1MB , latency=3ms ")
    assert budget.limits() == {"latency": pytest.approx(3.0), "size": 1_000_000}
    assert budget.bitops is None and budget.params is None and budget.accuracy_drop is None


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("latency=4", "unit"),
        ("latency=4min", "latency unit"),
        ("size=500", "unit"),
        ("size=500Kb", "size unit"),  # kilobits are not bytes
        ("size=500XB", "size unit"),
        ("bitops=1X", "suffix"),
        ("params=1MB", "suffix"),
        ("accuracy_drop=1", "percentage"),
        ("accuracy_drop=120%", "at most 100%"),
        ("speed=4ms", "unknown budget key"),
        ("latency", "KEY=VALUE"),
        ("latency=", "KEY=VALUE"),
        ("latency=abc", "expected"),
        ("latency=-4ms", "expected"),
        ("latency=0ms", "positive"),
        ("latency=4ms,latency=5ms", "twice"),
        ("latency=4ms,,size=1MB", "empty entry"),
    ],
)
def test_bad_budgets_are_one_line_bad_input(text: str, fragment: str) -> None:
    with pytest.raises(BadInputError) as info:
        parse_budget(text)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message
    assert info.value.exit_code == 2


def test_check_compares_each_limit() -> None:
    budget = Budget(latency_ms=4.0, size_bytes=1000, accuracy_drop=0.01)
    results = {c.name: c for c in budget.check({"latency": 3.9, "size": 1001, "accuracy_drop": None})}
    assert results["latency"].met
    assert not results["size"].met
    assert not results["accuracy_drop"].met  # not measured counts as not met
    assert set(results) == {"latency", "size", "accuracy_drop"}
