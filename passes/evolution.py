"""``evolution``: regularized (aging) evolution, Real et al. (AAAI 2019), on the DARTS cell space.

See :mod:`nas.sample.evolution`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fxsculpt.ir.errors import BadInputError
from fxsculpt.nas.sample.checkpointing import SearchCheckpoint
from fxsculpt.nas.sample.encoding import SearchSpace
from fxsculpt.nas.sample.evaluator import CandidateEvaluator
from fxsculpt.nas.sample.evolution import regularized_evolution
from fxsculpt.passes.base import Context
from fxsculpt.passes.options import option
from fxsculpt.passes.sample_search import SampleSearchOptions, SampleSearchPass


@dataclass
class EvolutionOptions(SampleSearchOptions):
    population: int = option(
        10, "population size P (paper: 100 for 20,000 evaluations; scaled to small budgets)"
    )
    sample: int = option(3, "tournament size S (paper: 25 of P = 100)")
    children: int = option(
        1,
        "children bred per cycle from one population and evaluated together (in parallel with "
        "--workers), the oldest as many removed; 1 is the paper's sequential Algorithm 1",
    )


class Evolution(SampleSearchPass):
    """Regularized evolution: tournament selection, one-token mutation, the oldest dies (Real et al. 2019)."""

    name = "evolution"
    Options = EvolutionOptions

    def search(
        self, space: SearchSpace, evaluator: CandidateEvaluator, ctx: Context, checkpoint: SearchCheckpoint
    ) -> dict[str, Any]:
        opts: EvolutionOptions = self.options
        if opts.population < 2 or not 1 <= opts.sample <= opts.population or opts.children < 1:
            raise BadInputError(
                "evolution needs population >= 2, 1 <= sample <= population and children >= 1"
            )
        regularized_evolution(
            space,
            evaluator,
            self.rng(ctx),
            opts.population,
            opts.sample,
            children=opts.children,
            checkpoint=checkpoint,
        )
        return {
            "population": opts.population,
            "sample": opts.sample,
            "children": opts.children,
            "proposals": evaluator.proposals,
        }
