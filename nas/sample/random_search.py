"""Random search over the cell grammar: the baseline every search method must beat.

Li & Talwalkar (2019, "Random search and reproducibility for NAS") and Yu et al. (2020,
"Evaluating the search phase of NAS") found random search with the same evaluation budget
hard to beat; each candidate here is drawn uniformly token by token from the grammar
(:meth:`SearchSpace.random_arch`), and with weight sharing the supernet trains on the
candidates drawn so far.
"""

from __future__ import annotations

import random

from nas.sample.encoding import SearchSpace
from nas.sample.evaluator import CandidateEvaluator


def random_search(space: SearchSpace, evaluator: CandidateEvaluator, rng: random.Random) -> None:
    """Evaluate uniformly drawn architectures until the evaluator's budget is spent."""
    drawn = []
    while not evaluator.exhausted:
        arch = space.random_arch(rng)
        drawn.append(arch)
        evaluator.evaluate_one(arch, pool=drawn)
