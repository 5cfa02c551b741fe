"""Kill and resume through the CLI: a run SIGKILLed after its first checkpoint and resumed with
``--resume OUT`` ends with the same weights and metrics as an uninterrupted run with the same seed;
a run whose loss turns NaN fails with exit 4 and keeps its last good checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from fxsculpt import cli

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 4


def _command(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "cli.py"),
        "optimize",
        "builtin:resnet",
        "--model-opt",
        "width=8",
        "--passes",
        "train",
        "--data",
        "digits",
        "--data-limit",
        "300",
        "--epochs",
        str(EPOCHS),
        "--batch-size",
        "32",
        "--seed",
        "3",
        "--out",
        str(out),
        *extra,
    ]


def _initializers(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints" / "train").glob("ckpt-*.pt"))


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference_out, killed_out = tmp_path / "reference", tmp_path / "killed"
    reference_log = (tmp_path / "reference.log").open("w")
    reference = subprocess.Popen(
        _command(reference_out, "--quiet"), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=reference_log
    )
    victim = subprocess.Popen(
        _command(killed_out, "--quiet"),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not _checkpoints(killed_out):
        assert victim.poll() is None, (
            f"the run ended before its first checkpoint: {victim.stderr.read()[-2000:]}"
        )  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    # Killed in the middle: nothing published, at least one complete checkpoint short of the end.
    assert not (killed_out / "report.json").exists() and not (killed_out / "model.onnx").exists()
    saved = [int(p.stem.split("-")[1]) for p in _checkpoints(killed_out)]
    assert saved and max(saved) < EPOCHS

    # A new run in that folder is refused rather than silently discarding the checkpoints.
    assert cli.main(_command(killed_out, "--quiet")[2:]) == 2
    refusal = capsys.readouterr().err.strip().splitlines()
    assert len(refusal) == 1 and f"--resume {killed_out}" in refusal[0]

    # Resuming with another seed would continue one run as another: refused, checkpoints kept.
    other_seed = [
        ("4" if a == "3" and b == "--seed" else a)
        for b, a in zip(["", *_command(killed_out)], _command(killed_out))
    ]
    assert cli.main([*other_seed[2:], "--quiet", "--resume", str(killed_out)]) == 2
    assert "started with seed=3, this command has seed=4" in capsys.readouterr().err
    assert [int(p.stem.split("-")[1]) for p in _checkpoints(killed_out)] == saved

    resumed = subprocess.run(
        _command(killed_out, "--resume", str(killed_out)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming after epoch {max(saved)} of {EPOCHS}" in resumed.stderr
    reference.wait(timeout=300)
    reference_log.close()
    assert reference.returncode == 0, (tmp_path / "reference.log").read_text()[-3000:]

    # Same weights, bit for bit, in the exported models.
    expected, got = _initializers(reference_out / "model.onnx"), _initializers(killed_out / "model.onnx")
    assert expected.keys() == got.keys() and expected
    for name, value in expected.items():
        assert np.array_equal(value, got[name]), name
    # Same metrics in the reports.
    ref_report = json.loads((reference_out / "report.json").read_text())
    new_report = json.loads((killed_out / "report.json").read_text())
    ref_train = next(p for p in ref_report["passes"] if p["name"] == "train")["summary"]
    new_train = next(p for p in new_report["passes"] if p["name"] == "train")["summary"]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert new_train[key] == ref_train[key], key
    assert new_report["metrics"] == ref_report["metrics"]
    # The run is complete: its checkpoints are gone, and nothing of the staging is left.
    assert not (killed_out / "checkpoints").exists()
    assert not list(killed_out.glob(".fxsculpt-staging-*"))


POISONED_PLUGIN = '''
"""A train pass whose model returns NaN on its 8th training batch: epoch 2, step 2 with 6 batches an epoch."""

import torch

from fxsculpt.passes import Pass
from fxsculpt.training.checkpoint import pass_checkpointer
from fxsculpt.training.loop import train_model


class PoisonedTrain(Pass):
    """Trains like the train pass, then its loss turns NaN."""

    name = "poisoned_train"

    def run(self, ir, ctx):
        calls = [0]

        def poison(module, inputs, output):
            if module.training:
                calls[0] += 1
                if calls[0] == 8:
                    return output * float("nan")
            return output

        handle = ir.gm.register_forward_hook(poison)
        try:
            train_model(ir.gm, ctx.data.train, ctx.train, ctx.device, ctx.generator("poison"),
                        checkpoint=pass_checkpointer(ctx), desc="poisoned")
        finally:
            handle.remove()
        return ir
'''


def test_nan_through_the_cli_keeps_the_last_good_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plugin = tmp_path / "poisoned.py"
    plugin.write_text(POISONED_PLUGIN)
    out = tmp_path / "out"
    argv = [
        "optimize",
        "builtin:resnet",
        "--model-opt",
        "width=8",
        "--plugin",
        str(plugin),
        "--passes",
        "poisoned_train",
        "--data",
        "digits",
        "--data-limit",
        "200",  # 180 training images after the 10% validation split: 6 batches of 32
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--out",
        str(out),
        "--quiet",
    ]
    assert cli.main(argv) == 4
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "loss is nan at epoch 2, step 2" in error[0]
    assert not (out / "model.onnx").exists() and not (out / "report.json").exists()
    folder = out / "checkpoints" / "poisoned_train"
    assert [p.name for p in sorted(folder.glob("ckpt-*.pt"))] == ["ckpt-000001.pt"]
    state = torch.load(folder / "ckpt-000001.pt", weights_only=True)
    assert state["epoch"] == 1 and all(bool(torch.isfinite(v).all()) for v in state["model"].values())
