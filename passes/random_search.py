"""``random``: random search over the cell grammar, the baseline the other searches must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fxsculpt.ir.errors import BadInputError
from fxsculpt.nas.sample.checkpointing import SearchCheckpoint
from fxsculpt.nas.sample.encoding import SearchSpace
from fxsculpt.nas.sample.evaluator import CandidateEvaluator
from fxsculpt.nas.sample.random_search import random_search
from fxsculpt.passes.base import Context
from fxsculpt.passes.options import option
from fxsculpt.passes.sample_search import SampleSearchOptions, SampleSearchPass


@dataclass
class RandomOptions(SampleSearchOptions):
    per_step: int = option(
        1, "architectures drawn per step and evaluated together (in parallel with --workers)"
    )


class RandomSearch(SampleSearchPass):
    """Random search: cells drawn uniformly from the grammar, the same budget as every other method."""

    name = "random"
    Options = RandomOptions

    def search(
        self, space: SearchSpace, evaluator: CandidateEvaluator, ctx: Context, checkpoint: SearchCheckpoint
    ) -> dict[str, Any]:
        opts: RandomOptions = self.options
        if opts.per_step < 1:
            raise BadInputError(f"random.per_step must be at least 1, got {opts.per_step}")
        random_search(space, evaluator, self.rng(ctx), per_step=opts.per_step, checkpoint=checkpoint)
        return {"proposals": evaluator.proposals}
