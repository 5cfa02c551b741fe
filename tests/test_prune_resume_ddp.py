"""The prune pass never loses work and scales out: a DSO search crashed after an epoch and resumed
from its checkpoint equals an uninterrupted one bit for bit (its λ, weights and pruned graph), a
resume with other settings is refused, a NaN loss stops with its epoch and step and keeps the last
good checkpoint, the pass resumes each of its phases, and 2 torchrun processes (crashing, then
resuming) search to the one-process result with the same global batch."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxsculpt.ir.errors import BadInputError, RunFailedError
from fxsculpt.ir.graph import IR
from fxsculpt.nas.dso.search import search, split_halves
from fxsculpt.passes.base import Context, TrainSettings
from fxsculpt.passes.prune import Prune
from fxsculpt.training.checkpoint import Checkpointer
from fxsculpt.training.data import load_data

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import prune_ddp_worker as worker  # noqa: E402
from launch import torchrun  # noqa: E402


def _edge_build() -> IR:
    """The worker's graph with its residual branch's λ already at zero (and frozen): the first
    removal deletes the branch, so the graph's code changes, not only its shapes."""
    ir = worker.build()
    lam = ir.gm.get_submodule("dso_gates.branch0").lam
    with torch.no_grad():
        lam.zero_()
    lam.requires_grad_(False)
    return ir


CASES = {
    # Channel cuts inside epochs 1 and 2 and after each epoch; λ from the other half of the data.
    "channels": (worker.build, False, 2),
    # A branch removed in epoch 1; W and λ from one batch.
    "edge": (_edge_build, True, 1),
}


def _search(case: str, folder: Path, resume: bool, crash_after: int | None = None, **changes: Any):
    build, joint, _ = CASES[case]
    ir = build()
    settings = replace(worker.SETTINGS, **changes)
    result = worker.run_search(
        ir, settings, joint=joint, checkpoint=Checkpointer(folder, resume=resume), crash_after=crash_after
    )
    return ir, result


@pytest.mark.parametrize("case", sorted(CASES))
def test_crash_after_an_epoch_then_resume_equals_an_uninterrupted_search(tmp_path: Path, case: str) -> None:
    crash_after = CASES[case][2]
    start = CASES[case][0]()
    reference, reference_result = _search(case, tmp_path / "a", resume=False)
    with pytest.raises(worker.Crash):
        _search(case, tmp_path / "b", resume=False, crash_after=crash_after)
    saved = sorted(p.name for p in (tmp_path / "b").glob("ckpt-*.pt"))
    assert saved[-1] == f"ckpt-{crash_after:06d}.pt"
    # The structure had changed before the crash, so the resume must rebuild it.
    assert reference_result.history[crash_after - 1]["macs"] < start.mac_count()
    if case == "edge":
        assert "branch0" in start.gm.code and "branch0" not in reference.gm.code
    resumed, resumed_result = _search(case, tmp_path / "b", resume=True)
    assert resumed.gm.code == reference.gm.code
    expected, got = reference.gm.state_dict(), resumed.gm.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:  # λ, weights and buffers, bit for bit
        assert torch.equal(got[key], expected[key]), key
    assert resumed_result.history == reference_result.history
    assert resumed_result.shrinks == reference_result.shrinks
    assert resumed_result.ranked_out == reference_result.ranked_out > 0
    assert len(reference_result.history) == worker.EPOCHS


def test_a_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    with pytest.raises(worker.Crash):
        _search("channels", tmp_path, resume=False, crash_after=1)
    with pytest.raises(BadInputError, match=r"made with gamma=0\.05 but this run has gamma=0\.1"):
        _search("channels", tmp_path, resume=True, gamma=0.1)
    with pytest.raises(BadInputError, match="scale_batches="):
        worker.run_search(worker.build(), joint=True, checkpoint=Checkpointer(tmp_path, resume=True))


def test_a_nan_loss_stops_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    dataset = worker.data()

    def poison_after_epoch_1(epoch: int, _: dict[str, float]) -> None:
        if epoch == 1:
            dataset.tensors[0].fill_(float("nan"))

    ir = worker.build()
    settings = replace(worker.SETTINGS, macs_target=int(worker.TARGET_FRACTION * ir.mac_count()))
    halves = split_halves(dataset, torch.Generator().manual_seed(2))
    with pytest.raises(RunFailedError) as failure:
        search(
            ir,
            *halves,
            settings,
            torch.Generator().manual_seed(7),
            checkpoint=Checkpointer(tmp_path),
            on_epoch=poison_after_epoch_1,
        )
    message = str(failure.value)
    assert "\n" not in message
    assert "loss is nan at epoch 2, step 1" in message
    assert "checkpoint of epoch 1 was kept" in message
    assert [p.name for p in sorted(tmp_path.glob("ckpt-*.pt"))] == ["ckpt-000001.pt"]
    state = torch.load(tmp_path / "ckpt-000001.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["modules"]["model"].values() if t.is_floating_point())


# -- the pass: pretrain, search and retrain have their own folders and resume ----------------------


class _Crash(Exception):
    pass


class SmallResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = x + F.relu(self.body(x))
        x = F.relu(self.head(x))
        return self.fc(x.mean(dim=(2, 3)))


def _run_pass(out: Path, resume: bool) -> tuple[IR, Context]:
    data = load_data("digits", seed=0, limit=240)
    torch.manual_seed(0)
    ir = IR.from_module(SmallResNet(), (1, 1, 8, 8), 10)
    ctx = Context(
        out_dir=out,
        stage_dir=out / "stage",
        data=data,
        train=TrainSettings(epochs=2, batch_size=32, lr=0.05, progress=False),
        checkpoint_dir=out / "checkpoints",
        resume_from=out if resume else None,
    )
    ctx.current_pass = "prune"
    options = {
        "pretrain_epochs": "1",
        "search_epochs": "2",
        "retrain_epochs": "2",
        "budget_points": "1",
        "macs_target": "0.6",
        "measure": "false",
    }
    return Prune(**options).run(ir, ctx), ctx


@pytest.mark.parametrize("phase", ["search", "retrain"])
def test_the_pass_checkpoints_its_phases_apart_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, phase: str
) -> None:
    reference, reference_ctx = _run_pass(tmp_path / "a", resume=False)
    folder = tmp_path / "a" / "checkpoints" / "prune"
    assert sorted(p.name for p in folder.iterdir()) == ["pretrain", "retrain", "search"]
    for name, last in (("pretrain", 1), ("search", 2), ("retrain", 2)):
        assert sorted(p.name for p in (folder / name).glob("ckpt-*.pt"))[-1] == f"ckpt-{last:06d}.pt"

    save = Checkpointer.save

    def crash_in_the_phase(self: Checkpointer, step: int, state: Any) -> Path | None:
        path = save(self, step, state)
        if self.folder.name == phase and step == 1:
            raise _Crash
        return path

    with monkeypatch.context() as patch:
        patch.setattr(Checkpointer, "save", crash_in_the_phase)
        with pytest.raises(_Crash):
            _run_pass(tmp_path / "b", resume=False)
    resumed, resumed_ctx = _run_pass(tmp_path / "b", resume=True)
    assert resumed.gm.code == reference.gm.code
    expected, got = reference.gm.state_dict(), resumed.gm.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    want, have = reference_ctx.sections["prune"], resumed_ctx.sections["prune"]
    assert have["history"] == want["history"]
    assert have["after"] == want["after"] and want["after"]["macs"] < want["before"]["macs"]


# -- torchrun: two processes, a crash and a resume, against one process ---------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_processes_crash_resume_and_search_to_the_one_process_result(tmp_path: Path) -> None:
    run = torchrun([str(ROOT / "tests" / "prune_ddp_worker.py"), str(tmp_path)])
    assert run.returncode == 0, run.stderr[-3000:]
    # Only rank 0 wrote checkpoints; they are of the 2-process run.
    saved = sorted((tmp_path / "checkpoints").glob("ckpt-*.pt"))
    assert [p.name for p in saved] == ["ckpt-000002.pt", "ckpt-000003.pt"]
    assert torch.load(saved[-1], weights_only=True)["config"]["world_size"] == 2
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for r in ranks:
        assert r["lambda_rank_difference"] == 0.0 and r["weight_rank_difference"] == 0.0
    for key in ranks[0]["state"]:  # λ and weights identical on both ranks
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
    ir = worker.build()
    initial_macs = ir.mac_count()
    result = worker.run_search(ir)
    assert ranks[0]["code"] == ir.gm.code
    assert ranks[0]["ranked_out"] == result.ranked_out > 0
    state = ir.gm.state_dict()
    assert ranks[0]["state"].keys() == state.keys()  # the same pruned structure
    for key, value in state.items():
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-4, atol=1e-6)
    assert len(ranks[0]["history"]) == len(result.history) == worker.EPOCHS
    for dist_stats, stats in zip(ranks[0]["history"], result.history):
        assert dist_stats["loss"] == pytest.approx(stats["loss"], rel=1e-5)
        assert dist_stats["accuracy"] == stats["accuracy"]
        assert dist_stats["macs"] == stats["macs"] < initial_macs
