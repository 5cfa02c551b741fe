"""Regularized (aging) evolution, Real et al. (AAAI 2019, "Regularized evolution for image
classifier architecture search", Algorithm 1).

A population of ``population`` (P) architectures starts random. Each cycle samples
``sample`` (S) members uniformly without replacement, mutates the best of them (one op or
one input of one node: :meth:`SearchSpace.mutate`), evaluates the child, appends it and
removes the *oldest* member, not the worst: every architecture dies young unless its
descendants keep re-winning tournaments, which regularizes against lucky evaluations.
"""

from __future__ import annotations

import random
from collections import deque

from nas.sample.encoding import Arch, SearchSpace
from nas.sample.evaluator import CandidateEvaluator


def regularized_evolution(
    space: SearchSpace,
    evaluator: CandidateEvaluator,
    rng: random.Random,
    population: int = 20,
    sample: int = 5,
) -> None:
    """Run aging evolution until the evaluator's budget is spent (Real et al. 2019, Alg. 1)."""
    if population < 2 or not 1 <= sample <= population:
        raise ValueError(
            f"need population >= 2 and 1 <= sample <= population, got P={population}, S={sample}"
        )
    members: deque[tuple[Arch, float]] = deque()
    while len(members) < population and not evaluator.exhausted:
        arch = space.random_arch(rng)
        score = evaluator.evaluate_one(arch, pool=[a for a, _ in members])
        if score is not None:
            members.append((arch, score))
    while not evaluator.exhausted and members:
        contenders = rng.sample(list(members), min(sample, len(members)))
        parent = max(contenders, key=lambda m: m[1])[0]
        child = space.mutate(parent, rng)
        score = evaluator.evaluate_one(child, pool=[a for a, _ in members])
        if score is None:
            break
        members.append((child, score))
        members.popleft()
