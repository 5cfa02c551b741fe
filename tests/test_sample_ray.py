"""Candidate evaluation on Ray workers: ``--workers 2`` finds what ``--workers 1`` finds, score for score.

Each pass runs twice through Pipeline + Context on a tiny darts-supernet and the built-in digits
data, once scoring in process and once with two Ray workers, with batches of 2 candidates per
step (NAO's new architectures and seed pool, RL's samples per update, evolution's children per
cycle, random search's draws per step) so that the workers really share the work. The
histories (every architecture, score and best-so-far, in order), the genotypes and the
methods' summaries must be identical. Skipped with a reason where Ray is not installed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

from fxsculpt.ir.load import LoadOptions, load_ir
from fxsculpt.passes.base import Context, TrainSettings
from fxsculpt.passes.pipeline import Pipeline
from fxsculpt.training import parallel
from fxsculpt.training.data import DataSplits, load_data

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'fxsculpt[distributed]')")

TINY = {"channels": "2", "layers": "3", "nodes": "2"}
FAST = {
    "budget": "6",
    "warmup_steps": "2",
    "steps_per_eval": "2",
    "val_batches": "1",
    "batch_size": "16",
    "final_epochs": "0",
    "plots": "false",
}
CASES: dict[str, tuple[str, dict[str, str]]] = {
    "nao": ("nao", {"controller_epochs": "3", "expand": "2", "seed_archs": "2", "new_archs": "2"}),
    "rl": ("rl", {"aggregate": "2"}),
    "evolution": ("evolution", {"population": "3", "sample": "2", "children": "2"}),
    "random": ("random", {"per_step": "3"}),
    "random-short-training": (
        "random",
        {"per_step": "2", "budget": "4", "evaluator": "short_training", "short_train_limit": "48"},
    ),
}


pytestmark = pytest.mark.usefixtures("ray_runtime")


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    data = load_data("digits", seed=0, val_fraction=0.25, limit=160)
    return dataclasses.replace(data, test=TensorDataset(*(t[:16] for t in data.test.tensors)))


def search(name: str, options: dict[str, str], data: DataSplits, out: Path, workers: int) -> dict[str, Any]:
    torch.manual_seed(0)
    ir = load_ir(
        "builtin:darts-supernet",
        LoadOptions(input_shape=(1, 1, 8, 8), num_classes=10, model_options=dict(TINY)),
    )
    ctx = Context(
        out_dir=out,
        stage_dir=out / "stage",
        data=data,
        seed=4,
        train=TrainSettings(epochs=0, batch_size=16, lr=0.05, progress=False),
        workers=workers,
    )
    Pipeline([name], options={name: FAST | options}, export=False).run(ir, ctx)
    history = json.loads((out / "stage" / "history.json").read_text())
    return {
        "evaluations": [(h["tokens"], h["score"], h["best_so_far"]) for h in history["history"]],
        "best": {k: v for k, v in history["best"].items() if k != "seconds"},  # wall clock differs
        "summary": history["summary"],
        "genotype": json.loads((out / "stage" / "genotype.json").read_text()),
    }


@pytest.mark.parametrize("case", list(CASES))
def test_two_ray_workers_find_what_one_process_finds(
    case: str, digits: DataSplits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, options = CASES[case]
    batches: list[int] = []  # candidates per call that went to the Ray workers
    original = parallel.map_in_order

    def counting(fn: Any, items: Any, workers: int = 1, *args: Any, **kwargs: Any) -> Any:
        items = list(items)
        assert workers == 2
        batches.append(len(items))
        return original(fn, items, workers, *args, **kwargs)

    monkeypatch.setattr(parallel, "map_in_order", counting)
    sequential = search(name, options, digits, tmp_path / "one", workers=1)
    assert batches == []  # one worker scores in this process
    with_ray = search(name, options, digits, tmp_path / "two", workers=2)
    budget = int((FAST | options)["budget"])
    assert len(sequential["evaluations"]) == budget
    assert with_ray == sequential
    # Every evaluation was scored on the workers, and batches of several candidates did occur.
    assert sum(batches) == budget and max(batches) >= 2, batches
    scores = [score for _, score, _ in sequential["evaluations"]]
    assert len(set(scores)) > 1 or case == "random-short-training"  # real, varied scores
