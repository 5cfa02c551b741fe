"""The ``quantize`` pass's options for ``method=haq``, with the official HAQ code's defaults.

The quantize pass's ``Options`` inherits these fields, so they are set as
``--set quantize.episodes=30`` and listed by ``cli.py passes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fxsculpt.passes.options import option


@dataclass
class HaqOptions:
    """HAQ's knobs (Wang et al., CVPR 2019; defaults of mit-han-lab/haq's ``rl_quantize.py``)."""

    episodes: int = option(600, "haq: search episodes (official default 600; 20 of them are random warm-up)")
    latency_ratio: float | None = option(
        None,
        "haq: latency budget r: limit = r x the uniform 8-bit model's latency on --target (ort-cpu: r >= 1); "
        "checked on the exported file like --budget (report.json budget section, exit 3 when missed)",
    )
    size_ratio: float | None = option(
        None,
        "haq: model-size budget r: limit = r x the uniform 8-bit model's size in bytes (exact count); "
        "checked on the exported model like --budget",
    )
    bitops_ratio: float | None = option(
        None,
        "haq: BitOps budget r: limit = r x the uniform 8-bit model's BitOps (exact count); "
        "checked on the exported model like --budget",
    )
    haq_min_bits: int = option(2, "haq: lowest bit-width an action can pick (b_min)")
    haq_max_bits: int = option(
        8, "haq: highest integer bit-width (b_max); on ort-cpu latency 'float' sits above it"
    )
    haq_warmup: int = option(20, "haq: episodes of uniform random actions before the agent acts")
    haq_hidden: str = option("300,300", "haq: actor/critic hidden sizes (the paper's 400,300 also works)")
    haq_search_samples: int = option(
        2000, "haq: training images in the search subset each episode fine-tunes on (0: all)"
    )
    haq_search_epochs: int = option(1, "haq: fine-tune passes over the search subset per episode (0: none)")
    haq_search_lr: float = option(1e-3, "haq: fine-tune learning rate during the search (SGD, momentum 0.9)")
    haq_low_bit_calibration: Literal["percentile", "kl", "minmax"] = option(
        "percentile",
        "haq: clip threshold of activations below 5 bits (the paper: kl; kl collapses them here, see quant.haq.env)",
    )
    haq_final_epochs: int = option(
        -1, "haq: epochs fine-tuning the best policy on the whole train split (-1: --epochs)"
    )
    haq_final_lr: float = option(1e-3, "haq: learning rate of that final fine-tune")
    haq_latency_margin: float = option(
        0.05,
        "haq: the search and the check of the exported file aim this fraction under a latency budget (headroom for re-measuring the file)",
    )
    haq_measure: bool = option(
        True,
        "haq: on a measured target (ort-cpu) calibrate the latency table on the exported int8 and float models, and lower bits until the chosen policy's exported file measures within the budget",
    )
    haq_measure_rounds: int = option(
        5, "haq: interleaved timing rounds per exported file in those measurements"
    )
