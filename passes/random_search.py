"""``random``: random search over the cell grammar, the baseline the other searches must beat."""

from __future__ import annotations

from typing import Any

from nas.sample.encoding import SearchSpace
from nas.sample.evaluator import CandidateEvaluator
from nas.sample.random_search import random_search
from passes.base import Context
from passes.sample_search import SampleSearchPass


class RandomSearch(SampleSearchPass):
    """Random search: cells drawn uniformly from the grammar, the same budget as every other method."""

    name = "random"

    def search(self, space: SearchSpace, evaluator: CandidateEvaluator, ctx: Context) -> dict[str, Any]:
        random_search(space, evaluator, self.rng(ctx))
        return {"proposals": evaluator.proposals}
