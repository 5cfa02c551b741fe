"""Run by tests/test_prune_resume_ddp.py under ``torchrun --nproc_per_node 2``: one rank of a DSO search.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/prune_ddp_worker.py OUT``.
Each rank searches the same small gated network on its shards of each global batch: first a
search that crashes after epoch 1 (checkpointed by rank 0 into ``OUT/checkpoints``), then its
resume to the end. Each rank writes ``OUT/rank<R>.pt`` with its final weights and λ, graph code
and history; the test compares them with one process searching with the same global batch.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from fxsculpt.ir.graph import IR  # noqa: E402
from fxsculpt.nas.dso.gating import gate_branches, gate_channels  # noqa: E402
from fxsculpt.nas.dso.search import SearchResult, SearchSettings, search, split_halves  # noqa: E402
from fxsculpt.training import distributed  # noqa: E402
from fxsculpt.training.checkpoint import Checkpointer  # noqa: E402

#: 64 samples, halves of 32, global batches of 8 (4 + 4 over 2 ranks): 4 steps per epoch.
SAMPLES, BATCH, EPOCHS = 64, 8, 3
#: Three budget cuts (after steps 3, 6 and 9, inside epochs) and a removal after every epoch.
SETTINGS = SearchSettings(epochs=EPOCHS, batch_size=BATCH, lr=0.1, gamma=0.05, budget_points=3, grad_clip=5.0)
TARGET_FRACTION = 0.6


class Crash(Exception):
    """Injected after an epoch to stand in for a killed run."""


class TinyResNet(nn.Module):
    """A stem, one residual block and a head; no BatchNorm (its batch statistics are per rank)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 6, 3, padding=1)
        self.body1 = nn.Conv2d(6, 6, 3, padding=1)
        self.body2 = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = x + self.body2(F.relu(self.body1(x)))
        x = F.relu(self.head(x))
        return self.fc(x.mean(dim=(2, 3)))


def build() -> IR:
    """The gated graph: a scalar gate on the residual branch and channel gates after the convs."""
    torch.manual_seed(0)
    ir = IR.from_module(TinyResNet().eval(), (1, 2, 6, 6), num_classes=3)
    gate_branches(ir)
    gate_channels(ir)
    return ir


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, 2, 6, 6, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 0).long()
    return TensorDataset(x, y)


def run_search(
    ir: IR,
    settings: SearchSettings = SETTINGS,
    joint: bool = False,
    checkpoint: Checkpointer | None = None,
    crash_after: int | None = None,
    dataset: TensorDataset | None = None,
) -> SearchResult:
    dataset = dataset if dataset is not None else data()
    weights_half, scales_half = split_halves(dataset, torch.Generator().manual_seed(2))
    if joint:
        weights_half, scales_half = dataset, None  # type: ignore[assignment]
    if settings.macs_target is None:
        settings = replace(settings, macs_target=int(TARGET_FRACTION * ir.mac_count()))

    def on_epoch(epoch: int, _: dict[str, float]) -> None:
        if epoch == crash_after:
            raise Crash

    return search(
        ir,
        weights_half,
        scales_half,
        settings,
        torch.Generator().manual_seed(7),
        checkpoint=checkpoint,
        on_epoch=on_epoch,
    )


def outcome(ir: IR, result: SearchResult) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in ir.gm.state_dict().items()},
        "code": ir.gm.code,
        "history": result.history,
        "ranked_out": result.ranked_out,
        "lambda_rank_difference": distributed.max_rank_difference(ir.arch_parameters()),
        "weight_rank_difference": distributed.max_rank_difference(ir.weight_parameters()),
    }


def main(out: Path) -> None:
    info = distributed.init_distributed("cpu")
    assert info is not None and info.world_size == 2, "start me with torchrun --nproc_per_node 2"
    folder = out / "checkpoints"
    writer = distributed.is_main_process()
    with contextlib.suppress(Crash):  # both ranks stop after epoch 1, as a killed run would
        run_search(build(), checkpoint=Checkpointer(folder, writer=writer), crash_after=1)
    distributed.barrier()
    ir = build()
    result = run_search(ir, checkpoint=Checkpointer(folder, resume=True, writer=writer))
    torch.save(outcome(ir, result), out / f"rank{info.rank}.pt")
    distributed.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
