"""The bad-input catalogue (README, "Bad input"): each case gives one clear line, its
documented exit code, and leaves no model.onnx or report.json behind."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from examples.models import ResidualNet
from fxsculpt import cli


@dataclass(frozen=True)
class BadCase:
    name: str
    argv: tuple[str, ...]  # {models}, {data} and {out} are filled in by the test
    exit_code: int
    fragment: str


CATALOGUE = [
    BadCase(
        "file that is not a model",
        ("inspect", "{models}/notes.pt", "--input-shape", "1,3,32,32"),
        2,
        "not a readable PyTorch file",
    ),
    BadCase(
        "truncated model file",
        ("inspect", "{models}/truncated.pt", "--input-shape", "1,3,32,32"),
        2,
        "truncated",
    ),
    BadCase(
        "pickled model without --trust-model",
        ("inspect", "{models}/residual.pt", "--input-shape", "1,3,32,32"),
        2,
        "--trust-model",
    ),
    BadCase(
        "state dict that does not match --model-class",
        (
            "inspect",
            "{models}/residual_state.pt",
            "--model-class",
            "examples.models:ConcatNet",
            "--input-shape",
            "1,3,32,32",
        ),
        2,
        "ConcatNet",
    ),
    BadCase(
        "input shape of the wrong rank",
        ("inspect", "{models}/residual.pt", "--trust-model", "--input-shape", "3,32,32"),
        2,
        "does not fit",
    ),
    BadCase(
        "unknown pass",
        ("optimize", "builtin:resnet", "--passes", "magic", "--data", "none"),
        2,
        "unknown pass 'magic'",
    ),
    BadCase(
        "unknown option",
        ("optimize", "builtin:resnet", "--passes", "fold_bn", "--set", "fold_bn.speed=2", "--data", "none"),
        2,
        "has no option 'speed'",
    ),
    BadCase(
        "bad option value",
        ("optimize", "builtin:resnet", "--passes", "quantize", "--set", "quantize.bits=11", "--data", "none"),
        2,
        "bits",
    ),
    BadCase(
        "budget with an unknown unit",
        ("optimize", "builtin:resnet", "--budget", "latency=4parsecs", "--data", "none"),
        2,
        "latency",
    ),
    BadCase(
        "impossible budget",
        (
            "optimize",
            "builtin:resnet",
            "--budget",
            "params=10",
            "--data",
            "none",
            "--input-shape",
            "1,3,32,32",
        ),
        3,
        "params",
    ),
    BadCase(
        "empty dataset", ("optimize", "builtin:resnet", "--data", "npz:{data}/empty.npz"), 2, "empty.npz"
    ),
    BadCase(
        "corrupt dataset",
        ("optimize", "builtin:resnet", "--data", "npz:{data}/corrupt.npz"),
        2,
        "corrupt.npz",
    ),
    BadCase(
        "labels outside the model's classes",
        ("optimize", "builtin:resnet", "--num-classes", "3", "--data", "npz:{data}/ten_classes.npz"),
        2,
        "labels",
    ),
    BadCase(
        "a model with no layer the pass can act on",
        (
            "optimize",
            "{models}/pool_only.pt",
            "--trust-model",
            "--input-shape",
            "1,3,8,8",
            "--passes",
            "quantize",
            "--data",
            "none",
        ),
        2,
        "quantize",
    ),
    BadCase(
        "training that diverges",
        (
            "optimize",
            "builtin:resnet",
            "--passes",
            "train",
            "--lr",
            "1e30",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--data",
            "npz:{data}/ten_classes.npz",
        ),
        4,
        "diverged",
    ),
]


class PoolOnly(torch.nn.Module):
    """No Conv or Linear at all: nothing for a quantizer to act on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    models = tmp_path_factory.mktemp("models")
    data = tmp_path_factory.mktemp("data")
    torch.manual_seed(0)
    model = ResidualNet().eval()
    torch.save(model, models / "residual.pt")
    torch.save(model.state_dict(), models / "residual_state.pt")
    torch.save(PoolOnly(), models / "pool_only.pt")
    (models / "notes.pt").write_text("these are my notes, not a model\n")
    whole = (models / "residual.pt").read_bytes()
    (models / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    rng = np.random.default_rng(0)
    np.savez(
        data / "ten_classes.npz",
        x_train=rng.integers(0, 256, (64, 3, 32, 32), dtype=np.uint8),
        y_train=np.arange(64) % 10,
        x_test=rng.integers(0, 256, (16, 3, 32, 32), dtype=np.uint8),
        y_test=np.arange(16) % 10,
    )
    empty = np.zeros((0, 3, 32, 32), dtype=np.uint8)
    np.savez(
        data / "empty.npz",
        x_train=empty,
        y_train=np.zeros(0, np.int64),
        x_test=empty,
        y_test=np.zeros(0, np.int64),
    )
    good = (data / "ten_classes.npz").read_bytes()
    (data / "corrupt.npz").write_bytes(good[:100] + b"\x00garbage" * 50)
    return {"models": models, "data": data}


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.name for c in CATALOGUE])
def test_bad_input(case: BadCase, files, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [a.format(models=files["models"], data=files["data"]) for a in case.argv]
    if argv[0] == "optimize":
        argv += ["--out", str(out), "--quiet"]
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == case.exit_code, err
    assert lines and lines[-1].startswith("error: "), err
    assert case.fragment in lines[-1], lines[-1]
    assert "Traceback" not in err
    assert not (out / "model.onnx").exists()
    if case.exit_code != 3:  # an over-budget run reports why, under a name that says so
        assert not (out / "report.json").exists()
    else:
        assert (out / "model.over-budget.onnx").exists()
