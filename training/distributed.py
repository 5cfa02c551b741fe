"""Data-parallel training under ``torchrun``: process group, sharded batches, DDP, rank-0 outputs.

``torchrun --nproc_per_node W cli.py optimize ...`` starts W copies of the program with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set. :func:`init_distributed` joins them into one
process group (gloo on CPU, NCCL on CUDA); the shared loop then wraps the model in
:class:`~torch.nn.parallel.DistributedDataParallel` (Li et al., "PyTorch Distributed", VLDB 2020),
which averages gradients over ranks in backward.

``--batch-size B`` stays the *global* batch: every rank draws the same permutation from the
same seeded generator, takes its contiguous share of each global batch of B (B/W samples when W
divides B), and the loss is scaled so that the averaged gradient is exactly the gradient of the
mean loss over the global batch. A W-process run therefore takes the same optimizer steps as a
one-process run with batch B, up to float summation order. (``DistributedSampler`` is not used
for the shards: it draws its own permutation from ``seed + epoch`` and pads the last batch with
repeated samples, so its runs cannot equal a one-process run.) Two things stay per rank, as in
any DDP run: BatchNorm statistics in training mode (each rank normalizes its share of the batch)
and dropout masks.

Architecture parameters (DARTS α, gate λ, bit logits) must stay identical on every rank: when
they are updated outside the DDP-wrapped backward, :func:`average_gradients` all-reduces their
gradients before the step and :func:`broadcast_parameters` re-aligns them from rank 0.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler

from fxsculpt.ir.errors import BadInputError

logger = logging.getLogger("fxsculpt")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the group and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


_INFO: DistInfo | None = None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise BadInputError(f"environment variable {name}={value!r} is not an integer") from None


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher) asked for more than one process (``WORLD_SIZE`` > 1)."""
    world = _env_int("WORLD_SIZE")
    return world is not None and world > 1


def init_distributed(device: torch.device | str = "cpu", timeout_s: float = 1800.0) -> DistInfo | None:
    """Join the process group torchrun describes; None (and nothing done) in a one-process run.

    The backend is gloo for CPU and NCCL for CUDA; on CUDA each process takes the GPU
    ``LOCAL_RANK`` (the returned ``device``). Calling it again returns the same information.
    """
    global _INFO
    if _INFO is not None:
        return _INFO
    if not launched_by_torchrun():
        return None
    rank, world, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if rank is None or world is None:
        raise BadInputError("WORLD_SIZE is set but RANK is not: start distributed runs with torchrun")
    local_rank = rank if local_rank is None else local_rank
    device = torch.device(device)
    if not dist.is_available():
        raise BadInputError("this PyTorch build has no torch.distributed support")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInputError("--device cuda was asked for, but no CUDA device is available")
        if local_rank >= torch.cuda.device_count():
            raise BadInputError(
                f"LOCAL_RANK {local_rank} has no GPU (this node has {torch.cuda.device_count()}): "
                "start at most one process per GPU (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    _INFO = DistInfo(rank=rank, world_size=world, local_rank=local_rank, backend=backend, device=device)
    return _INFO


def teardown() -> None:
    """Leave the process group (safe to call when none was joined)."""
    global _INFO
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _INFO = None


def active() -> DistInfo | None:
    """The group information when this process trains with others, else None."""
    if _INFO is not None and dist.is_available() and dist.is_initialized():
        return _INFO
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        rank, world = dist.get_rank(), dist.get_world_size()
        backend = str(dist.get_backend())
        device = (
            torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        )
        return DistInfo(rank=rank, world_size=world, local_rank=rank, backend=backend, device=device)
    return None


def rank() -> int:
    """This process's rank (0 in a one-process run)."""
    info = active()
    return info.rank if info else 0


def world_size() -> int:
    """How many processes train together (1 in a one-process run)."""
    info = active()
    return info.world_size if info else 1


def is_main_process() -> bool:
    """True on rank 0 and in a one-process run: the only process that writes outputs and checkpoints."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op in a one-process run)."""
    if active() is not None:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place and return it (unchanged in a one-process run)."""
    if active() is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a one-process run)."""
    info = active()
    if info is None:
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


# -- sharded batches -------------------------------------------------------------------------------


def shard_sizes(batch: int, world: int) -> list[int]:
    """How a global batch of ``batch`` samples splits over ``world`` ranks: near-equal, larger first."""
    base, extra = divmod(batch, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


class ShardedBatchSampler(Sampler[list[int]]):
    """Each global batch of ``batch_sampler``, cut into ``world`` contiguous shards; yields shard ``rank``.

    Every rank iterates the same global batches (the wrapped sampler draws from a generator
    seeded alike on every rank), so the union of the shards of step k is exactly the
    one-process batch k.
    """

    def __init__(self, batch_sampler: Iterable[list[int]], rank: int, world: int) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a world of {world}")
        self.batch_sampler = batch_sampler
        self.rank = rank
        self.world = world

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_sampler:
            sizes = shard_sizes(len(batch), self.world)
            start = sum(sizes[: self.rank])
            yield list(batch[start : start + sizes[self.rank]])

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]


def make_sharded_loader(
    dataset: Dataset[Any],
    batch_size: int,
    generator: torch.Generator,
    *,
    drop_last: bool,
    info: DistInfo,
) -> DataLoader[Any]:
    """A shuffled loader whose per-rank shards together form the one-process loader's batches.

    It consumes ``generator`` exactly as ``DataLoader(shuffle=True, generator=generator)`` does,
    so shuffling is identical to a one-process run. A last partial batch that would leave a rank
    fewer than two samples (BatchNorm cannot train on one) is dropped, with a log line.
    """
    world = info.world_size
    if batch_size < 2 * world:
        raise BadInputError(
            f"--batch-size {batch_size} is the global batch, shared by {world} processes: "
            f"it must be at least {2 * world} (two samples per process)"
        )
    n = len(dataset)  # type: ignore[arg-type]
    remainder = n % batch_size
    if not drop_last and 0 < remainder < 2 * world:
        drop_last = True
        if info.rank == 0:
            logger.info(
                "distributed: the last batch of %d samples cannot be shared by %d processes; it is skipped",
                remainder,
                world,
            )
    sampler = RandomSampler(dataset, generator=generator)  # type: ignore[arg-type]
    batches = BatchSampler(sampler, batch_size, drop_last)
    return DataLoader(
        dataset,
        batch_sampler=ShardedBatchSampler(batches, info.rank, world),
        generator=generator,
        num_workers=0,
    )


def shuffled_loader(
    dataset: Dataset[Any], batch_size: int, generator: torch.Generator, *, drop_last: bool
) -> DataLoader[Any]:
    """``DataLoader(shuffle=True, generator=...)`` alone, this rank's shards of it under torchrun.

    For search loops that keep their own loaders; pair it with :func:`local_loss_scale` and
    :func:`average_gradients`.
    """
    info = active()
    if info is None:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            generator=generator,
            drop_last=drop_last,
            num_workers=0,
        )
    return make_sharded_loader(dataset, batch_size, generator, drop_last=drop_last, info=info)


def local_loss_scale(local_count: int) -> float:
    """The factor on this rank's mean loss that makes averaged gradients those of the global mean.

    ``world * local / global``: 1.0 alone, and when shards are equal; it makes unequal shards
    (a global batch that ``world`` does not divide) count per sample, as in one process.
    """
    info = active()
    if info is None:
        return 1.0
    total = torch.tensor([float(local_count)], dtype=torch.float64)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return info.world_size * local_count / max(float(total), 1.0)


# -- models and architecture parameters ---------------------------------------------------------


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.parallel.DistributedDataParallel:
    """``model`` wrapped for data-parallel training; its parameters are broadcast from rank 0 first.

    ``static_graph``: a traced GraphModule runs the same graph every step, and DDP then copes
    with parameters the forward never uses (e.g. a search construct's unused candidates), which
    plain DDP would wait for forever, without re-walking the autograd graph every step.
    """
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, static_graph=True)


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """All-reduce the gradients of ``params`` to their mean over ranks (for updates outside DDP).

    Use it for architecture steps (DARTS α on validation batches, APG on λ, DFQ bit logits) whose
    backward does not go through a DDP wrapper: after it every rank holds the same gradient, so
    the same optimizer step keeps the parameters identical.
    """
    average_tensors([p.grad for p in params if p.grad is not None])


def average_tensors(tensors: Iterable[torch.Tensor]) -> None:
    """All-reduce ``tensors`` in place to their mean over ranks, in one message (a no-op alone)."""
    info = active()
    if info is None:
        return
    tensors = list(tensors)
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def broadcast_parameters(params: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``params`` on every rank with rank ``src``'s values (e.g. after a proximal step)."""
    if active() is None:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=src)


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s buffers (BatchNorm running statistics), as DDP does each forward.

    For search loops that average gradients themselves: call it at an epoch's end, before the
    model is checkpointed, pruned or evaluated, so every rank holds rank 0's statistics.
    """
    if active() is None:
        return
    with torch.no_grad():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=src)


def max_rank_difference(params: Iterable[torch.Tensor]) -> float:
    """The largest absolute difference of ``params`` between this rank and rank 0 (0.0 alone)."""
    info = active()
    tensors = [p.detach() for p in params]
    if info is None or not tensors:
        return 0.0
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    diff = (flat - reference).abs().max() if flat.numel() else torch.zeros(())
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


def rank_seed_offset(seed: int) -> int:
    """A per-rank seed for draws that should differ between ranks (dropout); ``seed`` itself on rank 0."""
    return (seed + 1_000_003 * rank()) % (2**63)


# -- outputs -------------------------------------------------------------------------------------


class RankLocalOutput:
    """The output folder of a rank other than 0: private staging, nothing published into ``out_dir``.

    It has :class:`passes.outputs.OutputFolder`'s interface so the CLI treats both alike.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.stage_dir = Path(tempfile.mkdtemp(prefix=f"fxsculpt-rank{rank()}-"))

    def publish(self, artifacts: Mapping[str, Path], report_files: Mapping[str, str]) -> list[Path]:
        """Nothing: only rank 0 publishes."""
        return []

    def discard(self) -> None:
        shutil.rmtree(self.stage_dir, ignore_errors=True)
