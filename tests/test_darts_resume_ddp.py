"""DARTS never loses work and scales out: a search crashed after an epoch and resumed from its
checkpoint equals an uninterrupted one bit for bit (in process, and through the CLI after SIGKILL),
and 2 torchrun processes search to the one-process result with the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from fxsculpt.nas.darts.search import SearchSettings, search
from fxsculpt.nas.darts.supernet import SearchNetwork
from fxsculpt.training.checkpoint import Checkpointer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import darts_ddp_worker  # noqa: E402
from launch import torchrun  # noqa: E402


class _Crash(Exception):
    pass


def _search(
    folder: Path, resume: bool, crash_after: int | None = None
) -> tuple[dict[str, torch.Tensor], list]:
    torch.manual_seed(0)
    model = SearchNetwork(num_classes=3, channels=4, layers=3, steps=2, multiplier=2)
    alphas = [*model._alphas["normal"], *model._alphas["reduce"]]
    ids = {id(a) for a in alphas}
    weights = [p for p in model.parameters() if id(p) not in ids]
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(48, 3, 8, 8, generator=g), torch.randint(0, 3, (48,), generator=g))
    train, val = torch.utils.data.random_split(data, [24, 24], generator=torch.Generator().manual_seed(2))

    def on_epoch(epoch: int, _: dict[str, float]) -> None:
        if epoch == crash_after:
            raise _Crash

    result = search(
        model,
        weights,
        alphas,
        train,
        val,
        SearchSettings(epochs=3, batch_size=8, order=2, channels_last=True),
        torch.device("cpu"),
        torch.Generator().manual_seed(5),
        on_epoch=on_epoch,
        checkpoint=Checkpointer(folder, resume=resume),
    )
    return {k: v.clone() for k, v in model.state_dict().items()}, [result.history, result.alpha_history]


def test_crash_after_an_epoch_then_resume_equals_an_uninterrupted_search(tmp_path: Path) -> None:
    reference, reference_log = _search(tmp_path / "a", resume=False)
    with pytest.raises(_Crash):
        _search(tmp_path / "b", resume=False, crash_after=1)
    saved = sorted(p.name for p in (tmp_path / "b").glob("ckpt-*.pt"))
    assert saved == ["ckpt-000001.pt"]
    resumed, resumed_log = _search(tmp_path / "b", resume=True)
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
        assert resumed[key].is_contiguous()  # handed back in the ordinary layout
    assert resumed_log == reference_log
    assert len(reference_log[0]) == 3 and len(reference_log[1]) == 4


def test_a_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    with pytest.raises(_Crash):
        _search(tmp_path / "b", resume=False, crash_after=1)
    folder = tmp_path / "b"
    state = torch.load(next(folder.glob("ckpt-*.pt")), weights_only=True)
    assert state["config"]["order"] == 2 and state["config"]["epochs"] == 3
    state["config"]["order"] = 1
    torch.save(state, next(folder.glob("ckpt-*.pt")))
    from fxsculpt.ir.errors import BadInputError

    with pytest.raises(BadInputError, match="order=1"):
        _search(folder, resume=True)


def _command(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "cli.py"),
        "optimize",
        "builtin:darts-supernet",
        "--model-opt",
        "layers=3",
        "--model-opt",
        "channels=4",
        "--model-opt",
        "nodes=2",
        "--model-opt",
        "multiplier=2",
        "--passes",
        "darts",
        "--set",
        "darts.epochs=4",
        "--set",
        "darts.batch_size=16",
        "--set",
        "darts.plots=false",
        "--data",
        "digits",
        "--data-limit",
        "200",
        "--seed",
        "3",
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_search_through_the_cli(tmp_path: Path) -> None:
    reference_out, killed_out = tmp_path / "reference", tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    reference = subprocess.Popen(
        _command(reference_out), cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    victim = subprocess.Popen(_command(killed_out), cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    folder = killed_out / "checkpoints" / "darts"
    deadline = time.monotonic() + 240
    while not list(folder.glob("ckpt-*.pt")):
        assert victim.poll() is None, (
            f"the run ended before its first checkpoint: {victim.stderr.read()[-2000:]}"
        )
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (killed_out / "model.onnx").exists() and not (killed_out / "report.json").exists()
    steps = sorted(p.name for p in folder.glob("ckpt-*.pt"))
    assert steps and steps[-1] != "ckpt-000004.pt", "killed too late to test a resume"
    resumed = subprocess.run(
        _command(killed_out, "--resume", str(killed_out)),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-2000:]
    for name in ("genotype.json",):
        assert (killed_out / name).read_text() == (reference_out / name).read_text()
    got = json.loads((killed_out / "report.json").read_text())
    want = json.loads((reference_out / "report.json").read_text())
    assert got["darts"]["mixture_weights"] == want["darts"]["mixture_weights"]
    assert got["darts"]["history"] == want["darts"]["history"]
    assert got["metrics"]["accuracy_after"] == want["metrics"]["accuracy_after"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_processes_search_to_the_one_process_result(tmp_path: Path) -> None:
    run = torchrun([str(ROOT / "tests" / "darts_ddp_worker.py"), str(tmp_path)])
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key in ranks[0]["state"]:  # α and weights identical on both ranks
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
    model = darts_ddp_worker.build()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    result = darts_ddp_worker.run_search(model)
    for key, value in model.state_dict().items():
        assert not torch.equal(value, initial[key]), key  # the search moved every tensor, α included
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-4, atol=1e-6)
    assert len(ranks[0]["history"]) == len(result.history) == darts_ddp_worker.EPOCHS
    for dist_stats, stats in zip(ranks[0]["history"], result.history):
        assert dist_stats["train_loss"] == pytest.approx(stats["train_loss"], rel=1e-5)
        assert dist_stats["train_accuracy"] == stats["train_accuracy"]
