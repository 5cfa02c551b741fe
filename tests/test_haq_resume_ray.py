"""HAQ never loses work and scales out over its warm-up.

- On a synthetic problem (no model, milliseconds): a search stopped right after its k-th
  checkpoint and resumed ends with the same final state (agent networks, Adam states, replay
  buffer, every RNG, curve, best policy) as an uninterrupted one, bit for bit; warm-up episodes
  evaluated in batches give the one-by-one search, also when a run stopped inside a batch is
  resumed one by one.
- Through the quantize pass on a small CNN and the digits data: a run killed after a search
  episode, resumed, killed in the final fine-tune and resumed again ends with the uninterrupted
  run's policy, learning curve and weights; a resume with other settings is refused; with Ray,
  ``workers=2`` gives the ``workers=1`` result, also killed inside a batch of the workers and
  resumed in one process (skipped with a reason where Ray is missing); without Ray,
  ``workers=2`` is a one-line message.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fxsculpt.ir.errors import BadInputError
from fxsculpt.ir.graph import IR
from fxsculpt.passes.base import Context, TrainSettings
from fxsculpt.passes.quantize import Quantize
from fxsculpt.quant.haq.actions import BitLevels
from fxsculpt.quant.haq.checkpoint import HaqCheckpoint
from fxsculpt.quant.haq.cost import resolve_budget, size_cost
from fxsculpt.quant.haq.ddpg import DDPGConfig
from fxsculpt.quant.haq.search import Evaluation, SearchResult, haq_search
from fxsculpt.quant.haq.state import LayerInfo, StateSpace
from fxsculpt.training import parallel
from fxsculpt.training.checkpoint import Checkpointer
from fxsculpt.training.data import DataSplits, load_data
from fxsculpt.training.loop import train_model


class Interrupted(Exception):
    """Stands for the kill: raised right after a checkpoint was written."""


class InterruptingCheckpointer(Checkpointer):
    """A checkpointer that stops the run after its ``stop_after``-th save."""

    def __init__(self, folder: Path, stop_after: int | None = None, resume: bool = False) -> None:
        super().__init__(folder, resume=resume)
        self.saves_left = stop_after

    def save(self, step: int, state: Any) -> Path | None:
        path = super().save(step, state)
        if self.saves_left is not None:
            self.saves_left -= 1
            if self.saves_left == 0:
                raise Interrupted
        return path


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Recursive equality, tensors bit for bit; wall-clock ``seconds`` are not part of the result."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        keys = set(a) - {"seconds", "timing_per_episode_s"}
        assert isinstance(b, dict) and keys == set(b) - {"seconds", "timing_per_episode_s"}, where
        for key in keys:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


# -- the search alone, on a synthetic problem ------------------------------------------------------

EPISODES, WARMUP = 9, 5


def synthetic(
    checkpointer: Checkpointer | None, batch: int = 1, episodes: int = EPISODES
) -> tuple[SearchResult, list[int]]:
    """Six layers whose accuracy falls with quantization noise, a size budget at half of 8 bits."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    layers = [LayerInfo(f"l{i}", "conv", 8, 8, 3, 1, 64, 576, 576 * 64, False) for i in range(6)]
    sens = [0.5, 2.0, 0.1, 1.0, 0.3, 0.05]
    levels = BitLevels(2, 8)
    cost = size_cost([576] * 6, levels)
    budget = resolve_budget(cost, levels, "synthetic", ratio=0.5)
    batches: list[int] = []

    def evaluate_batch(items: Any) -> list[Evaluation]:
        batches.append(len(items))
        return [
            Evaluation(1.0 - sum(s * 2.0 ** -int(w) for s, (w, _) in zip(sens, p, strict=True)) + 1e-3 * e)
            for e, p in items
        ]

    config = {"episodes": episodes, "seed": 3}
    checkpoint = HaqCheckpoint(checkpointer, config, counters={"cost": cost})
    result = haq_search(
        StateSpace(layers, two_steps=False),
        levels,
        cost,
        budget,
        lambda p: Evaluation(0.0),
        1.0,
        episodes,
        DDPGConfig(hidden=(16, 16), warmup=WARMUP, batch_size=8),
        seed=3,
        evaluate_batch=evaluate_batch,
        batch=batch,
        checkpoint=checkpoint,
    )
    return result, batches


def latest(folder: Path) -> dict[str, Any]:
    state = Checkpointer(folder, resume=True).load_latest()
    assert state is not None
    return state


@pytest.mark.parametrize("stop_after", [3, 7])  # inside the warm-up, and after the agent learnt
def test_a_stopped_search_resumes_to_the_uninterrupted_state(tmp_path: Path, stop_after: int) -> None:
    reference, _ = synthetic(Checkpointer(tmp_path / "a"))
    with pytest.raises(Interrupted):
        synthetic(InterruptingCheckpointer(tmp_path / "c", stop_after))
    assert Checkpointer(tmp_path / "c", resume=True).steps()[-1] == stop_after
    resumed, _ = synthetic(Checkpointer(tmp_path / "c", resume=True))
    assert [r.episode for r in resumed.curve] == list(range(EPISODES))
    assert resumed.best_policy == reference.best_policy and resumed.best_episode == reference.best_episode
    assert [r.reward for r in resumed.curve] == [r.reward for r in reference.curve]
    assert [r.policy for r in resumed.curve] == [r.policy for r in reference.curve]
    want, got = latest(tmp_path / "a"), latest(tmp_path / "c")
    assert want["step"] == got["step"] == EPISODES
    assert want["optimizers"]["actor"]["state"]  # Adam has moments: the agent really learnt
    assert_same(got, want)  # networks, targets, Adam, buffer, every RNG, curve, counters


def test_warmup_batches_equal_the_one_by_one_search_also_when_resumed_inside_a_batch(tmp_path: Path) -> None:
    one, one_batches = synthetic(Checkpointer(tmp_path / "one"))
    three, three_batches = synthetic(Checkpointer(tmp_path / "three"), batch=3)
    assert one_batches == [1] * EPISODES
    assert three_batches == [3, 2, 1, 1, 1, 1]  # the warm-up (5) in batches of 3, capped at its end
    assert_same(latest(tmp_path / "three"), latest(tmp_path / "one"))
    assert [r.reward for r in three.curve] == [r.reward for r in one.curve]
    # stopped after the first episode of the first batch (its partners were already evaluated) ...
    with pytest.raises(Interrupted):
        synthetic(InterruptingCheckpointer(tmp_path / "cut", 1), batch=3)
    # ... and resumed one by one: the saved agent RNG is the one-by-one run's after episode 0
    synthetic(Checkpointer(tmp_path / "cut", resume=True))
    assert_same(latest(tmp_path / "cut"), latest(tmp_path / "one"))


def test_a_search_resumed_with_other_settings_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Interrupted):
        synthetic(InterruptingCheckpointer(tmp_path, 2))
    with pytest.raises(BadInputError, match="episodes=9 but this run has episodes=12"):
        synthetic(Checkpointer(tmp_path, resume=True), episodes=12)


# -- the quantize pass ------------------------------------------------------------------------------


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


#: Five episodes, four of them random warm-up; BitOps on the analytical bit-serial target.
HAQ = {
    "method": "haq",
    "episodes": "5",
    "haq_warmup": "4",
    "bitops_ratio": "0.4",
    "haq_search_samples": "64",
    "haq_hidden": "16,16",
    "haq_final_epochs": "2",
}


@dataclass
class Problem:
    data: DataSplits
    weights: dict[str, torch.Tensor]  # SmallNet trained a little: low bits cost accuracy


@pytest.fixture(scope="module")
def problem() -> Problem:
    data = load_data("digits", seed=0, limit=240)
    torch.manual_seed(0)
    model = SmallNet()
    settings = TrainSettings(epochs=8, batch_size=32, lr=0.1, progress=False)
    train_model(model, data.train, settings, "cpu", torch.Generator().manual_seed(0))
    return Problem(data, model.state_dict())


def run_pass(
    out: Path, problem: Problem, resume: bool = False, workers: int = 1, **changes: str
) -> tuple[IR, Context]:
    model = SmallNet()
    model.load_state_dict(problem.weights)
    torch.manual_seed(0)
    ir = IR.from_module(model, (1, 1, 8, 8), 10)
    ctx = Context(
        out_dir=out,
        stage_dir=out / "stage",
        data=problem.data,
        seed=2,
        target="bitserial",
        train=TrainSettings(epochs=1, batch_size=32, lr=0.05, progress=False),
        checkpoint_dir=out / "checkpoints",
        resume_from=out if resume else None,
        workers=workers,
    )
    ctx.current_pass = "quantize"
    return Quantize(**(HAQ | changes)).run(ir, ctx), ctx


def outcome(ir: IR, ctx: Context) -> dict[str, Any]:
    """What a run ends with: the report's HAQ section, the learning curve and the frozen weights."""
    curve = json.loads((ctx.stage_dir / "haq_curve.json").read_text())
    weights = {k: v for k, v in ir.gm.state_dict().items()}
    return {"haq": ctx.sections["haq"], "curve": curve["episodes"], "best": curve["best"], "weights": weights}


def crash_at(monkeypatch: pytest.MonkeyPatch, phase: str, step: int) -> None:
    save = Checkpointer.save

    def crashing(self: Checkpointer, at: int, state: Any) -> Path | None:
        path = save(self, at, state)
        if self.folder.name == phase and at == step:
            raise Interrupted
        return path

    monkeypatch.setattr(Checkpointer, "save", crashing)


def test_the_pass_resumes_its_search_and_its_final_fine_tune(
    tmp_path: Path, problem: Problem, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = outcome(*run_pass(tmp_path / "a", problem))
    folder = tmp_path / "a" / "checkpoints" / "quantize"
    assert sorted(p.name for p in folder.iterdir()) == ["haq-finetune", "haq-search"]
    assert Checkpointer(folder / "haq-search", resume=True).steps() == [4, 5]
    assert Checkpointer(folder / "haq-finetune", resume=True).steps() == [1, 2]
    assert len(reference["curve"]) == 5 and len({e["reward"] for e in reference["curve"]}) > 1

    with monkeypatch.context() as patch:  # killed after the fourth episode (the last random one)
        crash_at(patch, "haq-search", 4)
        with pytest.raises(Interrupted):
            run_pass(tmp_path / "b", problem)
    with monkeypatch.context() as patch:  # resumed, then killed after the fine-tune's first epoch
        crash_at(patch, "haq-finetune", 1)
        with pytest.raises(Interrupted):
            run_pass(tmp_path / "b", problem, resume=True)
    resumed = outcome(*run_pass(tmp_path / "b", problem, resume=True))
    assert_same(resumed, reference)


def test_the_pass_refuses_a_resume_with_other_settings(
    tmp_path: Path, problem: Problem, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        crash_at(patch, "haq-search", 2)
        with pytest.raises(Interrupted):
            run_pass(tmp_path, problem)
    with pytest.raises(BadInputError, match=r"bitops_ratio=0\.4 but this run has bitops_ratio=0\.5") as info:
        run_pass(tmp_path, problem, resume=True, bitops_ratio="0.5")
    assert "\n" not in str(info.value) and "resume with the same command" in str(info.value)
    with pytest.raises(BadInputError, match="haq_search_samples=64 but this run has haq_search_samples=32"):
        run_pass(tmp_path, problem, resume=True, haq_search_samples="32")


def test_workers_without_ray_is_a_one_line_message(
    tmp_path: Path, problem: Problem, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(BadInputError) as info:
        run_pass(tmp_path, problem, workers=2)
    assert str(info.value) == parallel.RAY_MISSING and "\n" not in str(info.value)
    assert not (tmp_path / "checkpoints").exists()  # refused before any work


def test_two_ray_workers_find_what_one_process_finds(
    tmp_path: Path, problem: Problem, monkeypatch: pytest.MonkeyPatch, ray_runtime: None
) -> None:
    calls: list[tuple[int, int]] = []  # (workers, items) per map_in_order call
    original = parallel.map_in_order

    def counting(fn: Any, items: Any, workers: int = 1, *args: Any, **kwargs: Any) -> Any:
        items = list(items)
        calls.append((workers, len(items)))
        return original(fn, items, workers, *args, **kwargs)

    monkeypatch.setattr(parallel, "map_in_order", counting)
    sequential = outcome(*run_pass(tmp_path / "one", problem))
    assert calls == [(1, 1)] * 5
    calls.clear()
    with_ray = outcome(*run_pass(tmp_path / "two", problem, workers=2))
    assert calls == [(2, 2), (2, 2), (1, 1)]  # the warm-up on the workers, two at a time
    assert_same(with_ray, sequential)
    # killed after episode 0 of the first batch on the workers, resumed in one process: the same
    with monkeypatch.context() as patch:
        crash_at(patch, "haq-search", 1)
        with pytest.raises(Interrupted):
            run_pass(tmp_path / "cut", problem, workers=2)
    assert_same(outcome(*run_pass(tmp_path / "cut", problem, resume=True)), sequential)
