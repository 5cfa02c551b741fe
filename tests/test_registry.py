"""The pass registry: built-ins, a user's plugin file, clear errors for unknown names."""

from __future__ import annotations

from pathlib import Path

import pytest

from fxsculpt.ir.errors import BadInputError
from fxsculpt.passes import Pass, PassRegistry

PLUGIN = Path(__file__).with_name("plugin_example.py")


def test_plugin_file_registers_its_pass():
    registry = PassRegistry()
    classes = registry.load_plugin(PLUGIN)
    assert [c.name for c in classes] == ["count_ops"]
    assert "count_ops" in registry
    assert registry.get("count_ops").Options.__name__ == "CountOpsOptions"


def test_registries_are_independent_objects():
    first, second = PassRegistry(), PassRegistry()
    first.load_plugin(PLUGIN)
    assert "count_ops" in first and "count_ops" not in second


def test_unknown_pass_lists_the_known_ones():
    registry = PassRegistry()
    registry.load_plugin(PLUGIN)
    with pytest.raises(BadInputError, match=r"unknown pass 'nope' \(known passes: count_ops\)"):
        registry.get("nope")


def test_two_passes_with_one_name_are_refused():
    class A(Pass):
        name = "same"

    class B(Pass):
        name = "same"

    registry = PassRegistry()
    registry.register(A)
    with pytest.raises(BadInputError, match="two passes are named 'same'"):
        registry.register(B)


def test_plugin_errors_are_one_line(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    registry = PassRegistry()
    with pytest.raises(BadInputError, match="failed to import: RuntimeError: boom"):
        registry.load_plugin(broken)
    with pytest.raises(BadInputError, match="defines no Pass subclass"):
        registry.load_plugin(empty)
    with pytest.raises(BadInputError, match="does not exist"):
        registry.load_plugin(tmp_path / "missing.py")


def test_builtin_registry_finds_pass_modules():
    registry = PassRegistry.with_builtins()
    for cls in registry.classes():
        assert cls.name and cls.summary_line(), f"{cls.__name__} needs a name and a docstring"
