"""Random search over the cell grammar: the baseline every search method must beat.

Li & Talwalkar (2019, "Random search and reproducibility for NAS") and Yu et al. (2020,
"Evaluating the search phase of NAS") found random search with the same evaluation budget
hard to beat; each candidate here is drawn uniformly token by token from the grammar
(:meth:`SearchSpace.random_arch`), and with weight sharing the supernet trains on the
candidates drawn so far.

Draws are independent, so ``per_step`` of them are evaluated together (in parallel with
several workers); the draws themselves do not depend on ``per_step``, only the interleaving of
supernet training and scoring does.
"""

from __future__ import annotations

import random

from fxsculpt.nas.sample.checkpointing import SearchCheckpoint, Tracked, archs_from_tokens, archs_to_tokens
from fxsculpt.nas.sample.encoding import SearchSpace
from fxsculpt.nas.sample.evaluator import CandidateEvaluator


def random_search(
    space: SearchSpace,
    evaluator: CandidateEvaluator,
    rng: random.Random,
    *,
    per_step: int = 1,
    checkpoint: SearchCheckpoint | None = None,
) -> None:
    """Evaluate uniformly drawn architectures, ``per_step`` at a time, until the budget is spent.

    With ``checkpoint`` the state is saved after every step and a resumed run continues there.
    """
    if per_step < 1:
        raise ValueError(f"per_step must be at least 1, got {per_step}")
    checkpoint = checkpoint or SearchCheckpoint()
    tracked = Tracked(rngs={"draws": rng})
    saved = checkpoint.restore(evaluator, tracked)
    drawn = archs_from_tokens(space, saved["drawn"]) if saved is not None else []
    while not evaluator.exhausted:
        new = [space.random_arch(rng) for _ in range(min(per_step, evaluator.remaining))]
        drawn.extend(new)
        evaluator.evaluate(new, pool=drawn)
        checkpoint.save(evaluator, tracked, {"drawn": archs_to_tokens(space, drawn)})
