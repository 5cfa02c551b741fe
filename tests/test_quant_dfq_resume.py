"""DFQ never loses work and scales out: a search crashed after an epoch and resumed from its
checkpoint equals an uninterrupted one bit for bit; a resume with other settings is refused; a loss
that turns NaN stops with the epoch and step and keeps the last good checkpoint; the quantize pass
checkpoints its search and its fine-tune in separate folders and resumes both; and 2 torchrun
processes search to the one-process result with the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from fxsculpt.ir.errors import BadInputError, RunFailedError
from fxsculpt.ir.graph import IR
from fxsculpt.passes.base import Context, TrainSettings
from fxsculpt.passes.quantize import Quantize
from fxsculpt.training.checkpoint import Checkpointer
from fxsculpt.training.data import load_data

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quant_ddp_worker as worker  # noqa: E402
from launch import torchrun  # noqa: E402

EPOCHS = 3


class _Crash(Exception):
    pass


def _search(
    folder: Path, resume: bool, crash_after: int | None = None, **changes: Any
) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    model = worker.build()

    def on_epoch(epoch: int, _: dict[str, float]) -> None:
        if epoch == crash_after:
            raise _Crash

    settings = replace(worker.SETTINGS, **{"epochs": EPOCHS, **changes})
    history = worker.run_search(model, settings, Checkpointer(folder, resume=resume), on_epoch)
    return _tensors(model.state_dict()), history.epochs


def _tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a state dict, copied (the quantizers' extra state is a dict of settings)."""
    return {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}


def test_crash_after_an_epoch_then_resume_equals_an_uninterrupted_search(tmp_path: Path) -> None:
    reference, reference_history = _search(tmp_path / "a", resume=False)
    with pytest.raises(_Crash):
        _search(tmp_path / "b", resume=False, crash_after=1)
    assert sorted(p.name for p in (tmp_path / "b").glob("ckpt-*.pt")) == ["ckpt-000001.pt"]
    saved = torch.load(tmp_path / "b" / "ckpt-000001.pt", weights_only=True)
    assert set(saved["optimizers"]) == {"weights", "bits"} and "data" in saved["rng"]["generators"]
    assert saved["extra"]["constraint"]["smoothed"] is not None  # λ's loss estimate travels too
    resumed, resumed_history = _search(tmp_path / "b", resume=True)
    assert resumed.keys() == reference.keys()
    assert {"conv.bit_logits", "fc.bit_logits"} <= set(reference)
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
    assert resumed_history == reference_history and len(reference_history) == EPOCHS
    # the multiplier moved both ways, so resuming it exactly mattered
    multipliers = [e["multiplier"] for e in reference_history]
    assert len(set(multipliers)) == EPOCHS


def test_a_budget_search_resumes_its_size_multiplier_exactly(tmp_path: Path) -> None:
    """With a size budget (2.5 bits per weight, below the 14/3 of uniform logits) μ is the moving
    multiplier: it is saved, and the resumed search equals the uninterrupted one."""
    model = worker.build()
    n = sum(m.weight_numel_per_channel() * m.out_channels for m in model.searched().values())
    budget = {"size_budget_bits": 2.5 * n}
    reference, reference_history = _search(tmp_path / "a", resume=False, **budget)
    with pytest.raises(_Crash):
        _search(tmp_path / "b", resume=False, crash_after=1, **budget)
    saved = torch.load(tmp_path / "b" / "ckpt-000001.pt", weights_only=True)
    assert saved["extra"]["constraint"]["size_multiplier"] > 0.0
    resumed, resumed_history = _search(tmp_path / "b", resume=True, **budget)
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
    assert resumed_history == reference_history


def test_a_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    with pytest.raises(_Crash):
        _search(tmp_path, resume=False, crash_after=1)
    with pytest.raises(BadInputError, match=r"arch_lr=0\.2 but this run has arch_lr=0\.1"):
        _search(tmp_path, resume=True, arch_lr=0.1)
    with pytest.raises(BadInputError, match="epochs=3 but this run has epochs=4"):
        _search(tmp_path, resume=True, epochs=4)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt")) == ["ckpt-000001.pt"]  # left as they were


def test_a_nan_loss_names_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    model = worker.build()
    forwards = [0]

    def poison(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        forwards[0] += 1  # two forwards a step (weights, then α): call 11 is epoch 2, step 2's weights
        return output * float("nan") if forwards[0] == 11 else output

    model.register_forward_hook(poison)
    settings = replace(worker.SETTINGS, epochs=EPOCHS)
    with pytest.raises(RunFailedError) as failure:
        worker.run_search(model, settings, Checkpointer(tmp_path))
    message = str(failure.value)
    assert "\n" not in message
    assert "training loss is nan at epoch 2, step 2" in message
    assert [p.name for p in sorted(tmp_path.glob("ckpt-*.pt"))] == ["ckpt-000001.pt"]
    state = torch.load(tmp_path / "ckpt-000001.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in _tensors(state["modules"]["model"]).values())


# -- the quantize pass: its phases have their own folders and resume ---------------------------


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _run_pass(out: Path, resume: bool, method: str = "dfq") -> tuple[IR, Context]:
    data = load_data("digits", seed=0, limit=300)
    torch.manual_seed(0)
    ir = IR.from_module(SmallNet(), (1, 1, 8, 8), 10)
    ctx = Context(
        out_dir=out,
        stage_dir=out / "stage",
        data=data,
        train=TrainSettings(epochs=2, batch_size=32, lr=0.05, progress=False),
        checkpoint_dir=out / "checkpoints",
        resume_from=out if resume else None,
    )
    ctx.current_pass = "quantize"
    options = {"method": method, "search_epochs": "2", "finetune_epochs": "2"}
    return Quantize(**options).run(ir, ctx), ctx


def test_the_pass_checkpoints_search_and_fine_tune_apart_and_resumes_the_fine_tune(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, reference_ctx = _run_pass(tmp_path / "a", resume=False)
    folders = tmp_path / "a" / "checkpoints" / "quantize"
    assert sorted(p.name for p in folders.iterdir()) == ["dfq-finetune", "dfq-search"]
    assert [p.name for p in sorted((folders / "dfq-search").glob("ckpt-*.pt"))][-1] == "ckpt-000002.pt"
    assert [p.name for p in sorted((folders / "dfq-finetune").glob("ckpt-*.pt"))][-1] == "ckpt-000002.pt"

    save = Checkpointer.save

    def crash_in_the_fine_tune(self: Checkpointer, step: int, state: Any) -> Path | None:
        path = save(self, step, state)
        if self.folder.name == "dfq-finetune" and step == 1:
            raise _Crash
        return path

    with monkeypatch.context() as patch:
        patch.setattr(Checkpointer, "save", crash_in_the_fine_tune)
        with pytest.raises(_Crash):
            _run_pass(tmp_path / "b", resume=False)
    resumed, resumed_ctx = _run_pass(tmp_path / "b", resume=True)
    expected, got = reference.gm.state_dict(), resumed.gm.state_dict()
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key  # activation scales, bits
    want, have = reference_ctx.sections["quantization"], resumed_ctx.sections["quantization"]
    assert have["dfq"]["history"] == want["dfq"]["history"]
    assert have["layers"] == want["layers"]


def test_the_uniform_fine_tune_has_its_own_folder(tmp_path: Path) -> None:
    _run_pass(tmp_path, resume=False, method="uniform")
    folder = tmp_path / "checkpoints" / "quantize"
    assert sorted(p.name for p in folder.iterdir()) == ["uniform-finetune"]
    assert (folder / "uniform-finetune" / "ckpt-000002.pt").is_file()


# -- through the CLI: SIGKILL, then --resume --------------------------------------------------------


def _command(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "cli.py"),
        "optimize",
        "builtin:resnet",
        "--model-opt",
        "width=8",
        "--model-opt",
        "blocks=1",
        "--passes",
        "quantize",
        "--set",
        "quantize.method=dfq",
        "--set",
        "quantize.search_epochs=3",
        "--set",
        "quantize.finetune_epochs=1",
        "--data",
        "digits",
        "--data-limit",
        "300",
        "--batch-size",
        "32",
        "--seed",
        "3",
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_dfq_run_through_the_cli(tmp_path: Path) -> None:
    reference_out, killed_out = tmp_path / "reference", tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    reference = subprocess.Popen(
        _command(reference_out),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    victim = subprocess.Popen(
        _command(killed_out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    folder = killed_out / "checkpoints" / "quantize" / "dfq-search"
    deadline = time.monotonic() + 240
    while not list(folder.glob("ckpt-*.pt")):
        assert victim.poll() is None, (
            f"the run ended before its first checkpoint: {victim.stderr.read()[-2000:]}"
        )  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert not (killed_out / "model.onnx").exists() and not (killed_out / "report.json").exists()
    resumed = subprocess.run(
        _command(killed_out, "--resume", str(killed_out)),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-2000:]  # type: ignore[union-attr]
    expected, got = _initializers(reference_out / "model.onnx"), _initializers(killed_out / "model.onnx")
    assert expected.keys() == got.keys() and expected
    for name, value in expected.items():
        assert np.array_equal(value, got[name]), name
    want = json.loads((reference_out / "report.json").read_text())
    have = json.loads((killed_out / "report.json").read_text())
    assert have["quantization"]["dfq"] == want["quantization"]["dfq"]  # history, λ, chosen bits
    assert have["quantization"]["layers"] == want["quantization"]["layers"]
    assert have["metrics"] == want["metrics"]
    assert not (killed_out / "checkpoints").exists()  # a complete run leaves none


# -- two processes ---------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_processes_search_to_the_one_process_result(tmp_path: Path) -> None:
    run = torchrun([str(ROOT / "tests" / "quant_ddp_worker.py"), str(tmp_path)])
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for rank in ranks:
        rank["state"] = _tensors(rank["state"])
    for key in ranks[0]["state"]:  # bit logits and weights identical on both ranks
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
    assert ranks[0]["history"] == ranks[1]["history"]  # λ (and every statistic) identical too
    model = worker.build()
    initial = _tensors(model.state_dict())
    history = worker.run_search(model)
    for key, value in _tensors(model.state_dict()).items():
        assert not torch.equal(value, initial[key]), key  # the search moved every tensor, α included
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-4, atol=1e-6)
    assert len(ranks[0]["history"]) == len(history.epochs) == worker.EPOCHS
    for dist_stats, stats in zip(ranks[0]["history"], history.epochs):
        for name in ("train_loss", "val_loss", "multiplier", "avg_bits"):
            assert dist_stats[name] == pytest.approx(stats[name], rel=1e-5), name
