"""Where the scores of one batch of new candidates are computed: in this process, or as Ray tasks.

A search method proposes a batch of candidates; the evaluator's backend first does the
sequential, stateful part (the weight-sharing supernet's training steps), then hands out a
*scorer*: a picklable function of one architecture that reads a frozen snapshot (the supernet's
weights and the fixed validation batches, or the data and settings of a short training run).
:class:`ScoringWorkers` calls it on each candidate in this process when ``workers <= 1``, and
otherwise maps it over the batch as Ray tasks with :func:`training.parallel.map_in_order`
(input order kept, global RNGs seeded per candidate from ``seed`` and its place in the run).

A scorer draws from no global RNG (weight-sharing scores have no randomness; short training
seeds itself from the architecture), so a score depends only on the snapshot and the
architecture, never on which worker ran it or when: ``--workers 1`` and ``--workers N`` give
the same search. In this process the candidates are called directly, without the per-item
seeding, which would only add a millisecond per candidate to cheap synthetic scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fxsculpt.nas.sample.encoding import Arch

#: What a backend hands out: a pure, picklable function from an architecture to its score.
Scorer = Callable[[Arch], float]


@dataclass(frozen=True)
class ScoringWorkers:
    """How a batch of candidates is scored.

    ``workers``: 1 scores in this process, more scores each candidate as a Ray task (a local Ray
    runtime with that many CPUs, or the cluster at ``ray_address``); ``threads``: intra-op
    threads per candidate, the same in both cases so that the arithmetic is the same;
    ``seed``: the run's seed the per-candidate seeds are derived from.
    """

    workers: int = 1
    ray_address: str | None = None
    threads: int = 1
    seed: int = 0

    @property
    def remote(self) -> bool:
        """Whether scorers leave this process (they must then be portable: CPU, picklable)."""
        return self.workers > 1

    def map(self, scorer: Scorer, archs: Sequence[Arch], first_index: int) -> list[float]:
        """``[scorer(a) for a in archs]`` in order; ``first_index`` is the first candidate's place in the run."""
        if not self.remote:
            return [float(scorer(arch)) for arch in archs]
        from fxsculpt.training.parallel import derive_seed, map_in_order

        scores = map_in_order(
            scorer,
            list(archs),
            self.workers,
            self.ray_address,
            seed=derive_seed(self.seed, first_index),
            threads=self.threads,
        )
        return [float(s) for s in scores]
