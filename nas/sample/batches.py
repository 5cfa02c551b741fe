"""An endless stream of shuffled training minibatches whose position can be saved and restored.

The weight-sharing supernet draws one minibatch per training step, across as many passes over
the training split as the search needs. A Python generator over a ``DataLoader`` cannot be
checkpointed in the middle of a pass, so :class:`BatchStream` keeps the current pass's
permutation and its position explicitly: :meth:`state_dict` and :meth:`load_state_dict` put a
resumed search back on exactly the next batch.

The order is the one ``DataLoader(shuffle=True, generator=g, drop_last=...)`` gives with one
loader per pass (each pass draws the loader's base seed, then the sampler's permutation, and,
when the sampler runs out, the empty permutation of its remainder, all from ``g``), so the
stream replaces that loop without changing a single batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, default_collate


class BatchStream:
    """Shuffled minibatches of ``dataset`` forever, a fresh permutation from ``generator`` each pass.

    A dataset larger than one batch drops its last incomplete batch (a one-sample batch breaks
    BatchNorm in training mode); a smaller one yields itself whole as the only batch of a pass.
    """

    def __init__(self, dataset: Dataset[Any], batch_size: int, generator: torch.Generator) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.dataset = dataset
        self.size = len(dataset)  # type: ignore[arg-type]
        if self.size == 0:
            raise ValueError("cannot draw minibatches from an empty dataset")
        self.batch_size = batch_size
        self.generator = generator
        self.per_pass = self.size // batch_size if self.size > batch_size else 1
        self.order: torch.Tensor | None = None  # the current pass's permutation
        self.position = 0  # batches already taken from the current pass

    def _new_pass(self) -> None:
        if self.order is not None:
            # RandomSampler, exhausted, draws one more permutation for its (empty) remainder.
            torch.randperm(self.size, generator=self.generator)
        # DataLoader draws its iterator's base seed before the sampler's permutation.
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        self.order = torch.randperm(self.size, generator=self.generator)
        self.position = 0

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Any:
        if self.order is None or self.position >= self.per_pass:
            self._new_pass()
        assert self.order is not None
        start = self.position * self.batch_size
        indices = self.order[start : start + self.batch_size].tolist()
        self.position += 1
        return default_collate([self.dataset[i] for i in indices])

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: the generator, the current permutation and the position in it."""
        return {
            "generator": self.generator.get_state(),
            "order": self.order.clone() if self.order is not None else None,
            "position": self.position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` of a stream over the same dataset and batch size."""
        order = state["order"]
        if order is not None and int(order.numel()) != self.size:
            raise ValueError(
                f"the saved batch order covers {int(order.numel())} samples, the data has {self.size}"
            )
        self.generator.set_state(state["generator"])
        self.order = order.clone() if order is not None else None
        self.position = int(state["position"])
