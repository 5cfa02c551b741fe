"""Never lose a HAQ search: its whole state saved after every episode, restored on ``--resume``.

After an episode has been rewarded and the agent has learnt from it, nothing is in flight, so
:meth:`HaqCheckpoint.save` writes, atomically through :class:`training.checkpoint.Checkpointer`
(``OUT/checkpoints/quantize/haq-search/ckpt-<episodes done>.pt``):

- the DDPG agent: actor, critic and their target networks, both Adam states, the replay buffer
  (contents, size, write cursor), the reward baseline, the exploration σ and the last losses;
- every RNG: the agent's own ``torch.Generator`` (actions, truncated-normal noise, minibatches)
  and the global torch, NumPy and Python generators (:func:`training.checkpoint.training_state`);
- the search: the number of episodes done, the learning curve and the best policy so far, and
  the cost models' look-up counters (a report statistic).

A resumed search builds its agent exactly as a fresh run does, then :meth:`HaqCheckpoint.restore`
overwrites it with the newest checkpoint and the search continues with the next episode, ending
as an uninterrupted run with the same seed ends on CPU. A checkpoint made with other settings
(seed, episodes, budget, layers, any ``haq_*`` option) is refused with a one-line error.
Everything is stored as tensors, lists, dicts and scalars, loadable with ``weights_only=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fxsculpt.ir.errors import BadInputError, first_line
from fxsculpt.quant.haq.ddpg import DDPGAgent
from fxsculpt.quant.haq.enforce import Policy

if TYPE_CHECKING:
    from fxsculpt.quant.haq.search import EpisodeRecord
    from fxsculpt.training.checkpoint import Checkpointer

#: The ``kind`` recorded in every HAQ search checkpoint.
KIND = "haq_search"

_BUFFER_ARRAYS = ("states", "actions", "rewards", "next_states", "dones")


@dataclass
class Best:
    """The best episode so far: highest reward, first one on ties."""

    reward: float
    policy: Policy
    accuracy: float
    cost: float
    episode: int


@dataclass
class SearchProgress:
    """Where a search stands between episodes: what :meth:`HaqCheckpoint.restore` gives back."""

    next_episode: int = 0
    best: Best | None = None
    curve: list[EpisodeRecord] = field(default_factory=list)


def agent_modules(agent: DDPGAgent) -> dict[str, torch.nn.Module]:
    return {
        "actor": agent.actor,
        "critic": agent.critic,
        "actor_target": agent.actor_target,
        "critic_target": agent.critic_target,
    }


def agent_optimizers(agent: DDPGAgent) -> dict[str, torch.optim.Optimizer]:
    return {"actor": agent.actor_optim, "critic": agent.critic_optim}


def agent_state(agent: DDPGAgent) -> dict[str, Any]:
    """The agent's state besides networks, optimizers and its generator: buffer and scalars."""
    buffer = agent.buffer
    return {
        "buffer": {name: torch.from_numpy(getattr(buffer, name).copy()) for name in _BUFFER_ARRAYS},
        "buffer_size": buffer.size,
        "buffer_cursor": buffer.cursor,
        "baseline": agent.baseline,
        "value_loss": agent.value_loss,
        "policy_loss": agent.policy_loss,
        "sigma": agent.sigma,
    }


def load_agent_state(agent: DDPGAgent, state: Mapping[str, Any]) -> None:
    """Put back what :func:`agent_state` saved (a buffer of another shape is a ``ValueError``)."""
    buffer = agent.buffer
    for name in _BUFFER_ARRAYS:
        saved = state["buffer"][name].numpy()
        current = getattr(buffer, name)
        if saved.shape != current.shape:
            raise ValueError(f"replay buffer {name} has shape {tuple(saved.shape)}, expected {current.shape}")
        setattr(buffer, name, np.array(saved, dtype=current.dtype))
    buffer.size, buffer.cursor = int(state["buffer_size"]), int(state["buffer_cursor"])
    baseline = state["baseline"]
    agent.baseline = None if baseline is None else float(baseline)
    agent.value_loss, agent.policy_loss = float(state["value_loss"]), float(state["policy_loss"])
    agent.sigma = float(state["sigma"])


def _policy_rows(policy: Policy) -> list[list[Any]]:
    return [[w, a] for w, a in policy]


def _policy(rows: Any) -> Policy:
    return [(w, a) for w, a in rows]


class HaqCheckpoint:
    """Saves a HAQ search after every episode and resumes it from the newest save.

    ``checkpointer`` is the pass's (``pass_checkpointer(ctx, "haq-search")``); None turns
    checkpointing off (then :meth:`save` does nothing and :meth:`restore` returns None).
    ``config`` holds the settings the saved state depends on. ``counters`` are objects with a
    ``lookups`` attribute (the cost models) whose counts continue across a resume.
    """

    def __init__(
        self,
        checkpointer: Checkpointer | None,
        config: Mapping[str, Any] | None = None,
        counters: Mapping[str, Any] | None = None,
    ) -> None:
        self.checkpointer = checkpointer
        self.config = dict(config or {})
        self.counters = {name: obj for name, obj in (counters or {}).items() if obj is not None}

    @property
    def enabled(self) -> bool:
        return self.checkpointer is not None

    def counts(self) -> dict[str, int]:
        """The counters' look-ups now."""
        return {name: int(obj.lookups) for name, obj in self.counters.items()}

    def save(
        self,
        episodes_done: int,
        agent: DDPGAgent,
        progress: SearchProgress,
        counts: Mapping[str, int] | None = None,
    ) -> None:
        """Write the state after ``episodes_done`` episodes atomically (a no-op when off).

        ``counts``: the look-up counts as they were when that episode was costed (later episodes
        of a batch may have been costed since); the current ones by default.
        """
        from fxsculpt.training.checkpoint import training_state

        if self.checkpointer is None:
            return
        best = progress.best
        state = training_state(
            modules=agent_modules(agent),
            optimizers=agent_optimizers(agent),
            generators={"agent": agent.generator},
            agent=agent_state(agent),
            next_episode=progress.next_episode,
            best=None if best is None else {**asdict(best), "policy": _policy_rows(best.policy)},
            curve=[asdict(r) for r in progress.curve],
            counters=dict(counts) if counts is not None else self.counts(),
        )
        self.checkpointer.save(episodes_done, {**state, "kind": KIND, "config": self.config})

    def restore(self, agent: DDPGAgent) -> SearchProgress | None:
        """Load the newest checkpoint into ``agent`` (and the counters); None when there is none."""
        from fxsculpt.quant.haq.search import EpisodeRecord
        from fxsculpt.training.checkpoint import restore_training_state

        if self.checkpointer is None:
            return None
        state = self.checkpointer.load_latest(self.config)
        if state is None:
            return None
        folder = self.checkpointer.folder
        if state.get("kind") != KIND:
            raise BadInputError(f"{folder} holds a checkpoint of another kind ({state.get('kind')!r})")
        extra = restore_training_state(
            state,
            modules=agent_modules(agent),
            optimizers=agent_optimizers(agent),
            generators={"agent": agent.generator},
        )
        try:
            load_agent_state(agent, extra["agent"])
            best = extra["best"]
            progress = SearchProgress(
                next_episode=int(extra["next_episode"]),
                best=None if best is None else Best(**{**best, "policy": _policy(best["policy"])}),
                curve=[EpisodeRecord(**r) for r in extra["curve"]],
            )
            for name, obj in self.counters.items():
                obj.lookups = int(extra["counters"][name])
        except (KeyError, TypeError, ValueError) as exc:
            detail = first_line(exc)
            raise BadInputError(
                f"the checkpoint in {folder} does not fit this search ({detail}); resume with the same command"
            ) from exc
        logging.getLogger("fxsculpt").info(
            "haq: resuming after %d of %s episodes from %s",
            progress.next_episode,
            self.config.get("episodes", "?"),
            folder,
        )
        return progress
