"""Never lose a sample-based search: its whole state saved at every batch boundary, restored on resume.

A search method (NAO, the RL controller, evolution, random search) proposes a batch of
candidates, has them evaluated, updates itself, and then reaches a *boundary*: nothing is in
flight, so its state is small and complete. There it calls :meth:`SearchCheckpoint.save`,
which writes, atomically through :class:`training.checkpoint.Checkpointer`:

- the evaluator: its history (the spent budget; the cache is rebuilt from it), the count of
  proposals, and its backend's state (for weight sharing: the supernet's weights, its SGD
  state, the learning-rate schedule's position, the training batch order and the sampler);
- the method's :class:`Tracked` objects: modules (NAO's encoder-predictor-decoder, the RL
  controller), optimizers, named ``torch.Generator`` objects and Python ``random.Random``
  objects, plus every global RNG (:func:`training.checkpoint.training_state`);
- the method's own plain state (NAO's pool and counters, the RL baseline, the evolution
  population with birth order, the random sampler's draws), architectures as token lists.

A resumed method builds its objects exactly as a fresh run does, then calls
:meth:`SearchCheckpoint.restore`, which overwrites them with the newest checkpoint and returns
the method's plain state (None when there is nothing to resume): the run continues from that
boundary and ends exactly as an uninterrupted run with the same seed would on CPU.
Everything is stored as tensors, lists, dicts and scalars, loadable with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fxsculpt.ir.errors import BadInputError, first_line
from fxsculpt.nas.sample.encoding import Arch, SearchSpace

if TYPE_CHECKING:
    from fxsculpt.nas.sample.evaluator import CandidateEvaluator
    from fxsculpt.training.checkpoint import Checkpointer

#: The ``kind`` recorded in every sample-search checkpoint.
KIND = "sample_search"


def random_state(rng: random.Random) -> dict[str, Any]:
    """A Python ``random.Random``'s state as a tensor and plain values (weights_only-loadable)."""
    version, internal, gauss = rng.getstate()
    return {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def set_random_state(rng: random.Random, state: Mapping[str, Any]) -> None:
    """Put back what :func:`random_state` saved."""
    internal = tuple(int(v) for v in state["internal"].tolist())
    rng.setstate((int(state["version"]), internal, state["gauss"]))


def archs_to_tokens(space: SearchSpace, archs: Sequence[Arch]) -> list[list[int]]:
    """Architectures as token lists, the form checkpoints store them in."""
    return [space.to_tokens(a) for a in archs]


def archs_from_tokens(space: SearchSpace, rows: Sequence[Sequence[int]]) -> list[Arch]:
    """Inverse of :func:`archs_to_tokens`."""
    return [space.from_tokens([int(t) for t in row]) for row in rows]


@dataclass
class Tracked:
    """The stateful objects a method owns, by name: saved at every boundary and restored in place."""

    modules: dict[str, nn.Module] = field(default_factory=dict)
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    rngs: dict[str, random.Random] = field(default_factory=dict)


class SearchCheckpoint:
    """Saves a sample-based search at each batch boundary and resumes it from the newest save.

    ``checkpointer`` is the pass's (see :func:`training.checkpoint.pass_checkpointer`); None
    turns checkpointing off, and then :meth:`save` does nothing and :meth:`restore` returns None.
    ``config`` holds the settings the saved state depends on (method, budget, evaluator, ...):
    a checkpoint made with other values is refused with a one-line error.
    """

    def __init__(
        self, checkpointer: Checkpointer | None = None, config: Mapping[str, Any] | None = None
    ) -> None:
        self.checkpointer = checkpointer
        self.config = dict(config or {})
        self.boundary = 0  # boundaries saved so far: the next checkpoint's number
        self.resumed_at: int | None = None  # the boundary a resumed run continued from

    @property
    def enabled(self) -> bool:
        return self.checkpointer is not None

    def restore(self, evaluator: CandidateEvaluator, tracked: Tracked) -> dict[str, Any] | None:
        """Load the newest checkpoint into ``evaluator`` and ``tracked``; returns the method's state."""
        from fxsculpt.training.checkpoint import restore_training_state

        if self.checkpointer is None:
            return None
        state = self.checkpointer.load_latest(self.config)
        if state is None:
            return None
        if state.get("kind") != KIND:
            raise BadInputError(
                f"{self.checkpointer.folder} holds a checkpoint of another kind ({state.get('kind')!r})"
            )
        extra = restore_training_state(
            state, modules=tracked.modules, optimizers=tracked.optimizers, generators=tracked.generators
        )
        try:
            evaluator.load_state_dict(extra["evaluator"])
            for name, rng in tracked.rngs.items():
                set_random_state(rng, extra["rngs"][name])
        except (KeyError, ValueError, RuntimeError) as exc:
            detail = first_line(exc)
            raise BadInputError(
                f"the checkpoint in {self.checkpointer.folder} does not fit this search ({detail}); "
                "resume with the same command"
            ) from exc
        self.boundary = self.resumed_at = int(state["step"])
        logging.getLogger("fxsculpt").info(
            "%s: resuming after %d of %d evaluations from %s",
            self.config.get("method", "search"),
            evaluator.used,
            evaluator.budget,
            self.checkpointer.folder,
        )
        return dict(extra["method"])

    def save(self, evaluator: CandidateEvaluator, tracked: Tracked, method_state: Mapping[str, Any]) -> None:
        """Write the state at this boundary atomically (a no-op when checkpointing is off)."""
        from fxsculpt.training.checkpoint import training_state

        if self.checkpointer is None:
            return
        self.boundary += 1
        state = training_state(
            modules=tracked.modules,
            optimizers=tracked.optimizers,
            generators=tracked.generators,
            evaluator=evaluator.state_dict(),
            rngs={name: random_state(rng) for name, rng in tracked.rngs.items()},
            method=dict(method_state),
        )
        self.checkpointer.save(self.boundary, {**state, "kind": KIND, "config": self.config})
