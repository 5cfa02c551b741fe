"""Regularized (aging) evolution, Real et al. (AAAI 2019, "Regularized evolution for image
classifier architecture search", Algorithm 1).

A population of ``population`` (P) architectures starts random. Each cycle samples
``sample`` (S) members uniformly without replacement, mutates the best of them (one op or
one input of one node: :meth:`SearchSpace.mutate`), evaluates the child, appends it and
removes the *oldest* member, not the worst: every architecture dies young unless its
descendants keep re-winning tournaments, which regularizes against lucky evaluations.

Algorithm 1 is sequential: each child's tournament sees the population its predecessor left.
``children`` > 1 is the synchronous form of the paper's parallel setup (its workers bred from a
shared population while others were still being evaluated): each cycle runs ``children``
tournaments on the same population, evaluates the children together (in parallel with several
workers), appends them in order and removes as many of the oldest. ``children = 1`` (the
default) is Algorithm 1 exactly; the initial population is evaluated ``children`` at a time too.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Any

from fxsculpt.nas.sample.checkpointing import SearchCheckpoint, Tracked
from fxsculpt.nas.sample.encoding import Arch, SearchSpace
from fxsculpt.nas.sample.evaluator import CandidateEvaluator


@dataclass(frozen=True)
class Member:
    """One member of the population: its architecture, score and birth (its age's origin)."""

    arch: Arch
    score: float
    born: int


def _population_state(space: SearchSpace, members: deque[Member], births: int) -> dict[str, Any]:
    """The population, oldest first, and the birth counter, as checkpoints store them."""
    rows = [{"tokens": space.to_tokens(m.arch), "score": m.score, "born": m.born} for m in members]
    return {"members": rows, "births": births}


def _population_from(space: SearchSpace, state: dict[str, Any]) -> tuple[deque[Member], int]:
    """Inverse of :func:`_population_state`."""
    members = deque(
        Member(space.from_tokens([int(t) for t in row["tokens"]]), float(row["score"]), int(row["born"]))
        for row in state["members"]
    )
    return members, int(state["births"])


def regularized_evolution(
    space: SearchSpace,
    evaluator: CandidateEvaluator,
    rng: random.Random,
    population: int = 20,
    sample: int = 5,
    *,
    children: int = 1,
    checkpoint: SearchCheckpoint | None = None,
) -> None:
    """Run aging evolution until the evaluator's budget is spent (Real et al. 2019, Alg. 1).

    With ``checkpoint`` the population, the sampler and the evaluator are saved after every
    cycle (and every batch of the initial population); a resumed run continues there.
    """
    if population < 2 or not 1 <= sample <= population:
        raise ValueError(
            f"need population >= 2 and 1 <= sample <= population, got P={population}, S={sample}"
        )
    if children < 1:
        raise ValueError(f"children per cycle must be at least 1, got {children}")
    checkpoint = checkpoint or SearchCheckpoint()
    tracked = Tracked(rngs={"evolution": rng})
    saved = checkpoint.restore(evaluator, tracked)
    members: deque[Member] = deque()
    births = 0
    if saved is not None:
        members, births = _population_from(space, saved)
    while len(members) < population and not evaluator.exhausted:
        count = min(children, population - len(members), evaluator.remaining)
        new = [space.random_arch(rng) for _ in range(count)]
        scores = evaluator.evaluate(new, pool=[m.arch for m in members])
        for arch, score in zip(new, scores):
            if score is not None:
                members.append(Member(arch, score, births))
                births += 1
        checkpoint.save(evaluator, tracked, _population_state(space, members, births))
    while not evaluator.exhausted and members:
        offspring = []
        for _ in range(min(children, evaluator.remaining)):
            contenders = rng.sample(list(members), min(sample, len(members)))
            parent = max(contenders, key=lambda m: m.score)
            offspring.append(space.mutate(parent.arch, rng))
        scores = evaluator.evaluate(offspring, pool=[m.arch for m in members])
        spent = False
        for child, score in zip(offspring, scores):
            if score is None:  # the budget ran out within this cycle
                spent = True
                break
            members.append(Member(child, score, births))
            births += 1
            members.popleft()
        checkpoint.save(evaluator, tracked, _population_state(space, members, births))
        if spent:
            break
