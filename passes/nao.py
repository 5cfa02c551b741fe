"""``nao``: Neural Architecture Optimization (Luo et al., NeurIPS 2018) on the DARTS cell space.

Encoder, predictor and decoder are trained on the evaluated pool; new candidates are decoded
from gradient steps on the best architectures' embeddings (see :mod:`nas.sample.nao`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fxsculpt.nas.sample.checkpointing import SearchCheckpoint
from fxsculpt.nas.sample.encoding import SearchSpace
from fxsculpt.nas.sample.evaluator import CandidateEvaluator
from fxsculpt.nas.sample.nao import NAOSettings, nao_search
from fxsculpt.passes.base import Context
from fxsculpt.passes.options import option
from fxsculpt.passes.sample_search import SampleSearchOptions, SampleSearchPass


@dataclass
class NaoOptions(SampleSearchOptions):
    seed_archs: int = option(0, "initial random pool (0: a third of the budget, at least 2)")
    new_archs: int = option(
        0,
        "new candidates decoded per iteration, evaluated together (in parallel with --workers; "
        "0: a sixth of the budget, at least 1)",
    )
    controller_epochs: int = option(
        1000, "epochs of encoder-predictor-decoder training per iteration (official: 1000)"
    )
    trade_off: float = option(0.8, "λ in λ·MSE + (1 − λ)·NLL (official: 0.8)")
    expand: int = option(10, "copies per architecture for the branch-swap augmentation (official: 10)")
    top_k: int = option(100, "best architectures the gradient steps start from (official: 100)")
    max_step: int = option(50, "largest step size η tried (official: 50)")


class Nao(SampleSearchPass):
    """NAO: encode architectures, step along the predictor's gradient, decode new ones (Luo et al. 2018)."""

    name = "nao"
    Options = NaoOptions

    def search(
        self, space: SearchSpace, evaluator: CandidateEvaluator, ctx: Context, checkpoint: SearchCheckpoint
    ) -> dict[str, Any]:
        opts: NaoOptions = self.options
        settings = NAOSettings(
            epochs=opts.controller_epochs,
            trade_off=opts.trade_off,
            expand=opts.expand,
            top_k=opts.top_k,
            max_step=opts.max_step,
            seed_archs=opts.seed_archs,
            new_archs=opts.new_archs,
        )
        return nao_search(space, evaluator, ctx.generator("nao.controller"), settings, checkpoint=checkpoint)
