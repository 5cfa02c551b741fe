"""Clip thresholds for activation quantizers from observed values: min/max, percentile, KL.

Each method returns a threshold ``t`` (a non-negative magnitude); the quantizer's scale is
``t / positive_levels(bits, signed)``, so values beyond ``t`` are clipped.

- ``minmax``: the largest magnitude seen (no clipping; Jacob et al., CVPR 2018, §3).
- ``percentile``: the ``p``-th percentile of the magnitudes (e.g. 99.99), robust to outliers.
- ``kl``: the threshold whose clipped-and-quantized histogram is closest in KL divergence to the
  observed one (Migacz, "8-bit Inference with TensorRT", GTC 2017); HAQ (Wang et al., CVPR 2019,
  §3.4) uses it below 5 bits, where clipping pays most.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

Method = Literal["minmax", "percentile", "kl"]
METHODS: tuple[str, ...] = ("minmax", "percentile", "kl")
#: Relative mass given to Q bins that P occupies but the merge left empty.
SMOOTHING = 1e-4


def magnitudes(values: torch.Tensor | np.ndarray, signed: bool) -> np.ndarray:
    """The magnitudes a symmetric quantizer sees: ``|x|`` when signed, ``max(x, 0)`` when unsigned."""
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    array = array.astype(np.float64).ravel()
    return np.abs(array) if signed else np.clip(array, 0.0, None)


def minmax_threshold(values: torch.Tensor | np.ndarray, signed: bool) -> float:
    """The largest magnitude observed."""
    mags = magnitudes(values, signed)
    return float(mags.max()) if mags.size else 0.0


def percentile_threshold(values: torch.Tensor | np.ndarray, signed: bool, percentile: float = 99.99) -> float:
    """The ``percentile``-th percentile of the magnitudes (linear interpolation, as NumPy)."""
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    mags = magnitudes(values, signed)
    return float(np.percentile(mags, percentile)) if mags.size else 0.0


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(P || Q) of two unnormalized histograms (terms with p = 0 contribute nothing)."""
    p = p / p.sum()
    q = q / q.sum()
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def kl_divergence_at(hist: np.ndarray, cut: int, levels: int) -> float:
    """KL between the histogram clipped at bin ``cut`` and its ``levels``-level quantized version.

    P is ``hist[:cut]`` with the clipped tail added to its last bin. Q merges ``hist[:cut]``
    (without the tail) into ``levels`` equal chunks and spreads each chunk's mass evenly over the
    chunk's bins that are non-empty in P (Migacz 2017); a P bin left without Q mass gets a small
    ``SMOOTHING`` share instead of an infinite divergence. ``cut`` must be at least ``levels``.
    """
    kept = hist[:cut].astype(np.float64)
    p = kept.copy()
    p[-1] += float(hist[cut:].sum())
    occupied = (p > 0).astype(np.float64)
    starts = np.floor(np.arange(levels) * (cut / levels)).astype(np.int64)  # strictly increasing
    lengths = np.diff(np.append(starts, cut))
    mass = np.add.reduceat(kept, starts)
    count = np.add.reduceat(occupied, starts)
    per_bin = np.divide(mass, count, out=np.zeros_like(mass), where=count > 0)
    q = np.repeat(per_bin, lengths) * occupied
    empty = (p > 0) & (q <= 0)  # P mass where Q has none (the clipped tail's bin): smooth
    q[empty] = SMOOTHING * q.sum() / max(cut, 1)
    return _kl(p, q)


def kl_threshold(values: torch.Tensor | np.ndarray, bits: int, signed: bool, bins: int = 2048) -> float:
    """The threshold minimizing KL(P || Q) over cuts ``levels..bins`` of a ``bins``-bin histogram.

    ``levels`` is the number of positive quantization levels (``2^(b-1)`` signed, ``2^b`` unsigned).
    The threshold returned is the cut's upper bin edge.
    """
    mags = magnitudes(values, signed)
    peak = float(mags.max()) if mags.size else 0.0
    if peak <= 0.0:
        return 0.0
    levels = 2 ** (bits - 1) if signed else 2**bits
    hist, edges = np.histogram(mags, bins=bins, range=(0.0, peak))
    best_cut, best = bins, float("inf")
    for cut in range(levels, bins + 1):
        divergence = kl_divergence_at(hist, cut, levels)
        if divergence < best:
            best_cut, best = cut, divergence
    return float(edges[best_cut])


def threshold(
    values: torch.Tensor | np.ndarray, method: str, bits: int, signed: bool, percentile: float = 99.99
) -> float:
    """Dispatch on ``method`` (``minmax``, ``percentile`` or ``kl``)."""
    if method == "minmax":
        return minmax_threshold(values, signed)
    if method == "percentile":
        return percentile_threshold(values, signed, percentile)
    if method == "kl":
        return kl_threshold(values, bits, signed)
    raise ValueError(f"unknown calibration method '{method}' (known: {', '.join(METHODS)})")
