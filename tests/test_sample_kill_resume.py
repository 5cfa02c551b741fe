"""Kill and resume a sample-based search through the CLI.

``nao`` on a tiny ``builtin:darts-supernet`` is SIGKILLed after its first search checkpoint and
resumed with ``--resume OUT``; it must end exactly as an uninterrupted run with the same seed:
the same genotype.json, the same history.json (every evaluation's architecture, score and
best-so-far; only wall-clock seconds may differ), the same numbers in report.json and, since the
best network's final training is checkpointed too, the same weights in model.onnx.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
BUDGET = 6


def _command(out: Path, *extra: str) -> list[str]:
    options = {
        "budget": BUDGET,
        "seed_archs": 2,
        "new_archs": 2,  # boundaries: the seed pool, then two iterations of 2 candidates
        "warmup_steps": 2,
        "steps_per_eval": 8,
        "val_batches": 1,
        "batch_size": 16,
        "controller_epochs": 20,
        "expand": 2,
        "final_epochs": 1,
        "plots": "false",
    }
    sets = [arg for key, value in options.items() for arg in ("--set", f"nao.{key}={value}")]
    return [
        sys.executable,
        str(ROOT / "cli.py"),
        "optimize",
        "builtin:darts-supernet",
        *("--model-opt", "channels=2", "--model-opt", "layers=3", "--model-opt", "nodes=2"),
        "--passes",
        "nao",
        *sets,
        *("--data", "digits", "--data-limit", "120", "--val-fraction", "0.25"),
        *("--batch-size", "16", "--seed", "2", "--out", str(out)),
        *extra,
    ]


def _search_checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints" / "nao" / "search").glob("ckpt-*.pt"))


def _without_seconds(value: Any) -> Any:
    """The JSON without wall-clock times, which no two runs share."""
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_seconds(v) for v in value]
    return value


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.slow
def test_nao_killed_mid_search_and_resumed_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    reference_out, killed_out = tmp_path / "reference", tmp_path / "killed"
    reference_log = (tmp_path / "reference.log").open("w")
    reference = subprocess.Popen(
        _command(reference_out, "--quiet"), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=reference_log
    )
    victim_log = (tmp_path / "victim.log").open("w")
    victim = subprocess.Popen(
        _command(killed_out, "--quiet"), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=victim_log
    )
    deadline = time.monotonic() + 240
    while not _search_checkpoints(killed_out):
        log = (tmp_path / "victim.log").read_text()[-2000:]
        assert victim.poll() is None, f"the run ended before its first checkpoint: {log}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    victim_log.close()
    assert victim.returncode == -signal.SIGKILL
    # Killed in the middle of the search: nothing published, a complete checkpoint short of the budget.
    assert not (killed_out / "report.json").exists() and not (killed_out / "model.onnx").exists()
    saved = torch.load(_search_checkpoints(killed_out)[-1], weights_only=True)
    done = len(saved["extra"]["evaluator"]["history"])
    assert 0 < done < BUDGET

    resumed = subprocess.run(
        _command(killed_out, "--resume", str(killed_out)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "nao: resuming after" in resumed.stderr and f"of {BUDGET} evaluations" in resumed.stderr
    reference.wait(timeout=300)
    reference_log.close()
    assert reference.returncode == 0, (tmp_path / "reference.log").read_text()[-3000:]

    def read(out: Path, name: str) -> Any:
        return json.loads((out / name).read_text())

    assert read(killed_out, "genotype.json") == read(reference_out, "genotype.json")
    expected_history = read(reference_out, "history.json")
    assert len(expected_history["history"]) == BUDGET
    assert _without_seconds(read(killed_out, "history.json")) == _without_seconds(expected_history)
    got, expected = read(killed_out, "report.json"), read(reference_out, "report.json")
    assert got["metrics"] == expected["metrics"]
    summaries = [{p["name"]: p["summary"] for p in r["passes"]} for r in (got, expected)]
    assert summaries[0]["nao"] == summaries[1]["nao"]
    assert _without_seconds(got.get("nao")) == _without_seconds(expected.get("nao"))
    weights, expected_weights = (
        _initializers(killed_out / "model.onnx"),
        _initializers(reference_out / "model.onnx"),
    )
    assert weights.keys() == expected_weights.keys() and weights
    for name, value in expected_weights.items():
        assert np.array_equal(value, weights[name]), name
    assert not (killed_out / "checkpoints").exists()  # a complete run leaves no checkpoints
