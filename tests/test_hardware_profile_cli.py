"""``cli.py profile``: the layer table and totals for .onnx files and built-in models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fxsculpt.hardware.profile_cli import add_profile_arguments, run_profile
from fxsculpt.ir.errors import BadInputError
from fxsculpt.ir.graph import IR
from fxsculpt.passes.export import export_onnx


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_profile_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4)).eval()
    ir = IR.from_module(model, (1, 3, 6, 6), 4)
    path = tmp_path_factory.mktemp("cli") / "m.onnx"
    export_onnx(ir.gm, ir.example_input(batch=2), path)
    return path


def test_profile_onnx_json(onnx_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_profile(_parse([str(onnx_file), "--json", "--runs", "3"])) == 0
    result = json.loads(capsys.readouterr().out)
    ops = [row["op"] for row in result["layers"]]
    assert ("FusedConv" in ops or "Conv" in ops) and "Gemm" in ops
    assert sum(row["share"] for row in result["layers"]) == pytest.approx(1.0)
    assert result["target"] == "ort-cpu" and result["threads"] == 1
    assert result["latency_ms_median"] > 0


def test_profile_builtin_table_has_macs_and_totals(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse(["builtin:resnet", "--input-shape", "1,3,8,8", "--per-layer", "--runs", "2"])
    assert run_profile(args) == 0
    out = capsys.readouterr().out
    assert "layer1_0_conv1" in out and "share" in out and "MACs" in out
    assert "latency: median" in out and "BitOps" in out


def test_profile_bitserial_is_labelled_and_onnx_is_refused(
    onnx_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _parse(["builtin:mobilenet", "--input-shape", "1,3,8,8", "--target", "bitserial"])
    assert run_profile(args) == 0
    assert "analytical model, not a measurement" in capsys.readouterr().out
    with pytest.raises(BadInputError, match="bitserial"):
        run_profile(_parse([str(onnx_file), "--target", "bitserial"]))
    with pytest.raises(BadInputError, match="does not exist"):
        run_profile(_parse(["missing.onnx"]))
