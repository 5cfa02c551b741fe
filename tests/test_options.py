"""Typed pass options parsed from strings: the checks --set and the config file rely on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from fxsculpt.ir.errors import BadInputError
from fxsculpt.passes.options import build_options, describe_type, option, parse_value


@dataclass
class ExampleOptions:
    order: Literal[1, 2] = option(1, "first or second order")
    lr: float = option(0.1, "learning rate")
    epochs: int = option(3, "epochs")
    verbose: bool = option(False, "say more")
    bits: tuple[int, ...] = option((2, 4, 8), "candidate bit-widths")
    keep: list[str] = option(None, "layers kept", default_factory=list)
    limit: int | None = option(None, "optional cap")
    method: Literal["uniform", "dfq"] = option("uniform", "method")


def test_values_parse_to_declared_types():
    opts = build_options(
        ExampleOptions,
        {
            "order": "2",
            "lr": "3e-4",
            "epochs": "10",
            "verbose": "yes",
            "bits": "2,3",
            "keep": "conv1,fc",
            "limit": "7",
        },
        "example",
    )
    assert opts.order == 2 and isinstance(opts.order, int)
    assert opts.lr == pytest.approx(3e-4)
    assert opts.epochs == 10 and opts.verbose is True
    assert opts.bits == (2, 3)
    assert opts.keep == ["conv1", "fc"]
    assert opts.limit == 7


def test_toml_values_are_accepted_as_they_are():
    opts = build_options(
        ExampleOptions, {"bits": [4, 8], "verbose": False, "lr": 1, "limit": None}, "example"
    )
    assert opts.bits == (4, 8) and opts.verbose is False and opts.lr == 1.0 and opts.limit is None


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("order", "3", "expected one of 1, 2"),
        ("lr", "fast", "expected float"),
        ("epochs", "2.5", "expected int"),
        ("verbose", "maybe", "true or false"),
        ("method", "haq2", "expected one of uniform, dfq"),
        ("lr", "nan", "NaN"),
        ("bogus", "1", "has no option 'bogus'"),
    ],
)
def test_bad_values_name_the_option(key, value, fragment):
    with pytest.raises(BadInputError) as err:
        build_options(ExampleOptions, {key: value}, "example")
    assert fragment in str(err.value)
    assert "example" in str(err.value)


def test_integer_spelled_as_float_is_accepted():
    assert parse_value(int, "4.0", "x.y") == 4


def test_type_descriptions_for_the_passes_listing():
    assert describe_type(Literal[1, 2]) == "{1,2}"
    assert describe_type(tuple[int, ...]) == "tuple[int]"
    assert describe_type(int | None) == "int | none"
