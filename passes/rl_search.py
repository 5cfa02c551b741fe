"""``rl``: an LSTM controller trained with REINFORCE (Zoph & Le 2017) with ENAS's micro settings.

See :mod:`nas.sample.rl` for the controller and the update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fxsculpt.nas.sample.checkpointing import SearchCheckpoint
from fxsculpt.nas.sample.encoding import SearchSpace
from fxsculpt.nas.sample.evaluator import CandidateEvaluator
from fxsculpt.nas.sample.rl import ControllerSettings, reinforce_search
from fxsculpt.passes.base import Context
from fxsculpt.passes.options import option
from fxsculpt.passes.sample_search import SampleSearchOptions, SampleSearchPass


@dataclass
class RlOptions(SampleSearchOptions):
    lstm_size: int = option(64, "controller LSTM units (ENAS: 64)")
    tanh_constant: float = option(1.1, "logits squashed as c·tanh(l) (ENAS: 1.1; ops use c / 2.5)")
    entropy_weight: float = option(1e-4, "entropy bonus added to the reward (ENAS: 1e-4)")
    baseline_decay: float = option(0.99, "moving-average baseline decay (ENAS: 0.99)")
    controller_lr: float = option(3.5e-3, "controller Adam learning rate (ENAS: 3.5e-3)")
    aggregate: int = option(
        1,
        "samples per controller update, evaluated together (in parallel with --workers; "
        "ENAS: 10 on its far larger budget)",
    )


class RlSearch(SampleSearchPass):
    """RL-NAS: an LSTM controller samples cells and learns from their scores by REINFORCE (Zoph & Le; ENAS)."""

    name = "rl"
    Options = RlOptions

    def search(
        self, space: SearchSpace, evaluator: CandidateEvaluator, ctx: Context, checkpoint: SearchCheckpoint
    ) -> dict[str, Any]:
        opts: RlOptions = self.options
        settings = ControllerSettings(
            lstm_size=opts.lstm_size,
            tanh_constant=opts.tanh_constant,
            entropy_weight=opts.entropy_weight,
            baseline_decay=opts.baseline_decay,
            lr=opts.controller_lr,
            aggregate=max(1, opts.aggregate),
        )
        reinforce_search(space, evaluator, ctx.generator("rl.controller"), settings, checkpoint=checkpoint)
        return {"proposals": evaluator.proposals}
