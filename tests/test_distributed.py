"""DDP under torchrun: 2 CPU processes (gloo) train to the one-process result with the same global batch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from fxsculpt.training.loop import train_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import ddp_worker  # noqa: E402
from launch import torchrun  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    run = torchrun([str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path)], timeout=180, threads=None)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["main"] for r in ranks] == [True, False]
    # Crash after epoch 1 and resume, under DDP with per-rank dropout: bit-identical to no crash.
    assert [r["resumed_equal"] for r in ranks] == [True, True]
    # Parameters are identical on both ranks (DDP's averaged gradients, same optimizer steps).
    for key in ranks[0]["state"]:
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
    assert ranks[0]["spread"] == 0.0 and ranks[1]["spread"] == 0.0
    # The reference: one process, global batch 25, same seeds.
    model = ddp_worker.build()
    history = train_model(
        model, ddp_worker.toy_data(), ddp_worker.SETTINGS, "cpu", torch.Generator().manual_seed(7)
    )
    initial = ddp_worker.build().state_dict()
    for key, value in model.state_dict().items():
        if key.startswith("unused."):
            assert torch.equal(ranks[0]["state"][key], initial[key])  # no gradient, no step
            continue
        assert not torch.allclose(value, initial[key])  # training moved every used tensor
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-5, atol=1e-6)
    assert len(ranks[0]["history"]) == len(history) == ddp_worker.EPOCHS
    for dist_stats, stats in zip(ranks[0]["history"], history):
        assert dist_stats["loss"] == pytest.approx(stats["loss"], rel=1e-5)
        assert dist_stats["accuracy"] == stats["accuracy"]  # counted over all 110 samples on both
        assert dist_stats["lr"] == pytest.approx(stats["lr"])
    # Architecture-parameter helpers: gradients 1 and 2 average to 1.5; rank 0's value wins a broadcast.
    for r in ranks:
        assert torch.equal(r["alpha_grad"], torch.full((3,), 1.5))
        assert torch.equal(r["lam"], torch.full((2,), 1.0))


@pytest.mark.slow
def test_cli_under_torchrun_publishes_once_from_rank_zero(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = torchrun(
        [
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
            "160",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--out",
            str(out),
            "--quiet",
        ],
        timeout=300,
        threads=None,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert names in (
        ["model.onnx", "report.json", "report.md"],
        ["model.onnx", "model.onnx.data", "report.json", "report.md"],
    )
    assert run.stdout.count("wrote ") == 3  # one rank printed and published
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok"
