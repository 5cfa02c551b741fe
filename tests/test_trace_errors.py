"""Untraceable models get one line naming the user's file:line and the fix, never a traceback.

Expected line numbers are found by searching the model's source text, not taken from
the code under test.
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import examples.models as example_models
from fxsculpt.ir.errors import BadInputError
from fxsculpt.ir.load import LoadOptions, load_ir
from fxsculpt.ir.trace import trace_module


def _line_of(path: Path, needle: str) -> int:
    lines = path.read_text().splitlines()
    matches = [i + 1 for i, line in enumerate(lines) if needle in line]
    assert len(matches) == 1, f"{needle!r} should occur once in {path}"
    return matches[0]


def _import_file(path: Path, name: str) -> object:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_control_flow_in_submodule_names_line_and_leaf_fix() -> None:
    source = Path(example_models.__file__)
    line = _line_of(source, "if x.sum() > 0:")
    with pytest.raises(BadInputError) as info:
        trace_module(example_models.BranchyNet())
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 2
    assert f"models.py:{line} `if x.sum() > 0:`" in message
    assert "data-dependent control flow" in message
    assert "--leaf-modules DataDependentGate" in message and "torch.export" in message


def test_leaf_module_fix_makes_it_traceable() -> None:
    torch.manual_seed(0)
    model = example_models.BranchyNet().eval()
    gm = trace_module(model, leaf_modules=("DataDependentGate",))
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    assert "gate" in targets and "gate.pos" not in targets
    for sign in (1.0, -1.0):  # both branches still run, decided at run time
        x = sign * torch.rand(2, 3, 8, 8)
        torch.testing.assert_close(gm(x), model(x))


def test_len_and_iteration_in_user_file(tmp_path: Path) -> None:
    path = tmp_path / "user_models_trace.py"
    path.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class Rows(nn.Module):
                def forward(self, x):
                    return torch.stack([row * 2 for row in x])

            class Length(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.conv = nn.Conv2d(3, 3, 1)

                def forward(self, x):
                    return self.conv(x) / len(x)

            class Outer(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.inner = Length()

                def forward(self, x):
                    return self.inner(x) + 1
            """
        )
    )
    module = _import_file(path, "user_models_trace")
    with pytest.raises(BadInputError) as info:
        trace_module(module.Rows())  # type: ignore[attr-defined]
    message = str(info.value)
    assert f"user_models_trace.py:{_line_of(path, 'for row in x')}" in message
    assert "iteration over a traced tensor" in message
    assert "rewrite that line" in message and "torch.export" in message  # the root cannot be a leaf
    with pytest.raises(BadInputError) as info:
        trace_module(module.Outer())  # type: ignore[attr-defined]
    message = str(info.value)
    assert f"user_models_trace.py:{_line_of(path, '/ len(x)')} `return self.conv(x) / len(x)`" in message
    assert "len() of a traced tensor" in message
    assert "--leaf-modules Length" in message and "\n" not in message


def test_load_ir_reports_untraceable_pickles(tmp_path: Path) -> None:
    torch.save(example_models.BranchyNet(), tmp_path / "branchy.pt")
    with pytest.raises(BadInputError, match=r"cannot trace BranchyNet with torch\.fx at .*models\.py:\d+"):
        load_ir(str(tmp_path / "branchy.pt"), LoadOptions(trust_model=True, input_shape=(1, 3, 8, 8)))
    ir = load_ir(
        str(tmp_path / "branchy.pt"),
        LoadOptions(trust_model=True, input_shape=(1, 3, 8, 8), leaf_modules=("DataDependentGate",)),
    )
    assert ir.num_classes == 10
