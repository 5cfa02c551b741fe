"""Checkpoints: atomic saves, RNG round trips, exact resume of the shared loop, NaN keeps the last good one."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from fxsculpt.ir.errors import BadInputError, RunFailedError
from fxsculpt.passes.base import Context, TrainSettings
from fxsculpt.training import checkpoint as ckpt_mod
from fxsculpt.training.checkpoint import (
    Checkpointer,
    capture_rng,
    pass_checkpointer,
    restore_rng,
    restore_training_state,
    training_state,
)
from fxsculpt.training.loop import train_model


def _toy_data(n: int = 80) -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    return TensorDataset(x, y)


class DropNet(nn.Module):
    """Conv, BatchNorm (running statistics) and dropout (global RNG): all three must resume exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4 * 36, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.flatten(F.relu(self.bn(self.conv(x))), 1)))


class Crash(Exception):
    """Stands in for a kill right after a checkpoint was written."""


SETTINGS = TrainSettings(epochs=4, batch_size=16, lr=0.1, progress=False)


def _run(
    folder: Path | None, resume: bool, init_seed: int = 0, crash_after: int | None = None
) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    torch.manual_seed(init_seed)
    model = DropNet()
    checkpoint = Checkpointer(folder, resume=resume) if folder is not None else None

    def on_epoch_end(epoch: int, _: dict[str, float]) -> None:
        if crash_after is not None and epoch == crash_after:
            raise Crash

    history = train_model(
        model,
        _toy_data(),
        SETTINGS,
        "cpu",
        torch.Generator().manual_seed(5),
        checkpoint=checkpoint,
        on_epoch_end=on_epoch_end,
    )
    return history, {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    reference_history, reference = _run(None, resume=False)
    folder = tmp_path / "ckpt"
    with pytest.raises(Crash):
        _run(folder, resume=False, crash_after=2)
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt-000001.pt", "ckpt-000002.pt"]
    # Different initial weights on purpose: everything must come from the checkpoint.
    history, state = _run(folder, resume=True, init_seed=99)
    assert history == reference_history
    for key in reference:
        assert torch.equal(state[key], reference[key]), key
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt-000003.pt", "ckpt-000004.pt"]  # keep=2


def test_resume_of_a_finished_phase_trains_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    history, state = _run(folder, resume=False)
    calls: list[int] = []
    torch.manual_seed(7)
    model = DropNet()
    again = train_model(
        model,
        _toy_data(),
        SETTINGS,
        "cpu",
        torch.Generator().manual_seed(5),
        checkpoint=Checkpointer(folder, resume=True),
        on_epoch_end=lambda epoch, _: calls.append(epoch),
    )
    assert calls == [] and again == history
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)


def test_resume_refuses_other_settings(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    with pytest.raises(Crash):
        _run(folder, resume=False, crash_after=1)
    other = TrainSettings(epochs=5, batch_size=16, lr=0.1, progress=False)
    with pytest.raises(BadInputError, match=r"epochs=4 but this run has epochs=5"):
        train_model(
            DropNet(),
            _toy_data(),
            other,
            "cpu",
            torch.Generator().manual_seed(5),
            checkpoint=Checkpointer(folder, resume=True),
        )


def test_a_fresh_run_clears_old_checkpoints_and_only_the_writer_writes(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    Checkpointer(folder).save(3, {"x": torch.ones(2)})
    reader = Checkpointer(folder, resume=False, writer=False)
    assert reader.steps() == [3]  # not the writer: it leaves files alone
    assert reader.save(4, {"x": torch.ones(2)}) is None and reader.steps() == [3]
    assert reader.load_latest() is None  # not resuming
    Checkpointer(folder, resume=False)  # the writer of a new run starts afresh
    assert Checkpointer(folder, resume=True).steps() == []


def test_save_is_atomic_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "ckpt"
    good = Checkpointer(folder)
    good.save(1, {"w": torch.arange(4.0)})

    def half_written(obj: object, handle: object) -> None:
        handle.write(b"PK\x03\x04 partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", half_written)
    with pytest.raises(OSError, match="disk full"):
        good.save(2, {"w": torch.zeros(4)})
    monkeypatch.undo()
    assert [p.name for p in folder.iterdir()] == ["ckpt-000001.pt"]  # no partial file, no temp left
    state = Checkpointer(folder, resume=True).load_latest()
    assert state is not None and state["step"] == 1 and torch.equal(state["w"], torch.arange(4.0))


def test_an_unreadable_newest_checkpoint_falls_back_to_the_one_before(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    writer = Checkpointer(folder, keep=3)
    writer.save(1, {"w": torch.ones(1)})
    writer.save(2, {"w": torch.full((1,), 2.0)})
    (folder / "ckpt-000002.pt").write_bytes(b"garbage")
    state = Checkpointer(folder, resume=True).load_latest()
    assert state is not None and state["step"] == 1


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    torch.randn(3, generator=gen)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    saved = capture_rng({"g": gen})
    Checkpointer(tmp_path).save(0, {"rng": saved})
    expected = (
        torch.rand(5),
        np.random.rand(5),
        [random.random() for _ in range(5)],
        torch.rand(5, generator=gen),
    )
    expected_gauss = random.gauss(0, 1)
    torch.manual_seed(100)
    np.random.seed(100)
    random.seed(100)
    gen.manual_seed(100)
    loaded = Checkpointer(tmp_path, resume=True).load_latest()
    assert loaded is not None
    restore_rng(loaded["rng"], {"g": gen})
    assert torch.equal(torch.rand(5), expected[0])
    assert np.array_equal(np.random.rand(5), expected[1])
    assert [random.random() for _ in range(5)] == expected[2]
    assert torch.equal(torch.rand(5, generator=gen), expected[3])
    assert random.gauss(0, 1) == expected_gauss


class _Poisoned(nn.Module):
    """NaN logits on call ``nan_call``; with ``inf_after`` it corrupts its weight after that call instead."""

    def __init__(self, nan_call: int | None = None, inf_after: int | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(36, 4)
        self.calls = 0
        self.nan_call, self.inf_after = nan_call, inf_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.fc(x.flatten(1))
        if self.calls == self.inf_after:
            with torch.no_grad():
                self.fc.bias[0] = float("inf")  # the loss of this batch is still finite
        return out * float("nan") if self.calls == self.nan_call else out


def _good_states(model: nn.Module) -> tuple[dict[int, dict[str, torch.Tensor]], object]:
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def record(epoch: int, _: dict[str, float]) -> None:
        seen[epoch] = {k: v.clone() for k, v in model.state_dict().items()}

    return seen, record


def test_nan_loss_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Poisoned(nan_call=6)  # 80 samples / batch 32 = 3 steps per epoch: epoch 2, step 3
    seen, record = _good_states(model)
    settings = TrainSettings(epochs=4, batch_size=32, lr=0.1, progress=False)
    folder = tmp_path / "ckpt"
    with pytest.raises(RunFailedError, match=r"loss is nan at epoch 2, step 3"):
        train_model(
            model,
            _toy_data(),
            settings,
            "cpu",
            torch.Generator().manual_seed(0),
            checkpoint=Checkpointer(folder),
            on_epoch_end=record,  # type: ignore[arg-type]
        )
    state = Checkpointer(folder, resume=True).load_latest()
    assert state is not None and state["epoch"] == 1
    assert all(torch.equal(state["model"][k], seen[1][k]) for k in seen[1])
    assert all(bool(torch.isfinite(v).all()) for v in state["model"].values())


def test_weights_turning_infinite_are_never_checkpointed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Poisoned(inf_after=6)  # corrupts the bias during the last batch of epoch 2
    seen, record = _good_states(model)
    settings = TrainSettings(epochs=4, batch_size=32, lr=0.1, progress=False)
    folder = tmp_path / "ckpt"
    with pytest.raises(RunFailedError, match=r"weights are no longer finite after epoch 2"):
        train_model(
            model,
            _toy_data(),
            settings,
            "cpu",
            torch.Generator().manual_seed(0),
            checkpoint=Checkpointer(folder),
            on_epoch_end=record,  # type: ignore[arg-type]
        )
    assert Checkpointer(folder, resume=True).steps() == [1]
    state = Checkpointer(folder, resume=True).load_latest()
    assert state is not None and all(torch.equal(state["model"][k], seen[1][k]) for k in seen[1])


def test_pass_checkpointer_folders(tmp_path: Path) -> None:
    ctx = Context(out_dir=tmp_path, stage_dir=tmp_path / "stage")
    ctx.current_pass = "train"
    assert pass_checkpointer(ctx) is None  # checkpointing is off unless the run asks for it
    ctx.checkpoint_dir = tmp_path / "checkpoints"
    first = pass_checkpointer(ctx, "search")
    assert first is not None and first.folder == tmp_path / "checkpoints" / "train" / "search"
    assert not first.resume
    ctx.pass_occurrence = 2
    second = pass_checkpointer(ctx)
    assert second is not None and second.folder == tmp_path / "checkpoints" / "train.2"
    ctx.resume_from = tmp_path / "old"
    resumed = pass_checkpointer(ctx)
    assert resumed is not None and resumed.resume
    assert resumed.folder == tmp_path / "old" / "checkpoints" / "train.2"


def _search_loop(folder: Path, resume: bool, crash_after: int | None = None) -> dict[str, torch.Tensor]:
    """A miniature bi-level search (weights by SGD, α by Adam, dropout, its own generator)."""
    torch.manual_seed(0)
    net = DropNet()
    alpha = nn.Parameter(torch.zeros(3))
    holder = nn.Module()
    holder.alpha = alpha
    w_opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    a_opt = torch.optim.Adam([alpha], lr=0.01)
    gen = torch.Generator().manual_seed(4)
    data = _toy_data(32)
    checkpoint = Checkpointer(folder, resume=resume)
    first = 1
    history: list[float] = []
    saved = checkpoint.load_latest({"epochs": 4})
    if saved is not None:
        extra = restore_training_state(
            saved,
            modules={"net": net, "arch": holder},
            optimizers={"w": w_opt, "a": a_opt},
            generators={"data": gen},
        )
        first, history = int(extra["epoch"]) + 1, list(extra["history"])
    for epoch in range(first, 5):
        order = torch.randperm(32, generator=gen)
        x, y = data.tensors[0][order[:16]], data.tensors[1][order[:16]]
        w_opt.zero_grad()
        a_opt.zero_grad()
        loss = F.cross_entropy(net(x), y) + (alpha.softmax(0) * torch.arange(3.0)).sum() * float(
            torch.rand(())
        )
        loss.backward()
        w_opt.step()
        a_opt.step()
        history.append(float(loss.detach()))
        checkpoint.save(
            epoch,
            {
                "config": {"epochs": 4},
                **training_state(
                    modules={"net": net, "arch": holder},
                    optimizers={"w": w_opt, "a": a_opt},
                    generators={"data": gen},
                    epoch=epoch,
                    history=history,
                ),
            },
        )
        if epoch == crash_after:
            raise Crash
    return {**net.state_dict(), "alpha": alpha.detach().clone(), "history": torch.tensor(history)}


def test_training_state_resumes_a_search_loop_exactly(tmp_path: Path) -> None:
    reference = _search_loop(tmp_path / "a", resume=False)
    with pytest.raises(Crash):
        _search_loop(tmp_path / "b", resume=False, crash_after=2)
    resumed = _search_loop(tmp_path / "b", resume=True)
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), key
