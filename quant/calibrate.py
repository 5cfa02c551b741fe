"""Clip thresholds for activation quantizers from observed values: min/max, percentile, KL.

Each method returns a threshold ``t`` (a non-negative magnitude); the quantizer's scale is
``t / positive_levels(bits, signed)``, so values beyond ``t`` are clipped.

- ``minmax``: the largest magnitude seen (no clipping; Jacob et al., CVPR 2018, §3).
- ``percentile``: the ``p``-th percentile of the magnitudes (e.g. 99.99), robust to outliers.
- ``mse``: the range, a fraction of the observed one, whose quantized values are nearest the
  observed ones in mean squared error (as AIMET's and NNCF's MSE range estimators): it clips a
  long tail only when the finer step it buys elsewhere outweighs the clipped error.
- ``kl``: the threshold whose clipped-and-quantized histogram is closest in KL divergence to the
  observed one (Migacz, "8-bit Inference with TensorRT", GTC 2017); HAQ (Wang et al., CVPR 2019,
  §3.4) uses it below 5 bits, where clipping pays most.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from fxsculpt.quant.fake_quant import affine_grid, quant_range

Method = Literal["minmax", "percentile", "kl", "mse"]
METHODS: tuple[str, ...] = ("minmax", "percentile", "kl", "mse")
#: Fractions of the observed range the ``mse`` method tries, from all of it down to 30%.
MSE_FRACTIONS: np.ndarray = np.linspace(1.0, 0.3, 71)
#: Relative mass given to Q bins that P occupies but the merge left empty.
SMOOTHING = 1e-4


def as_float64(values: torch.Tensor | np.ndarray) -> np.ndarray:
    """``values`` as a flat float64 NumPy array."""
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    return array.astype(np.float64).ravel()


def magnitudes(values: torch.Tensor | np.ndarray, signed: bool) -> np.ndarray:
    """The magnitudes a symmetric quantizer sees: ``|x|`` when signed, ``max(x, 0)`` when unsigned."""
    array = as_float64(values)
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


def _squared_error(x: np.ndarray, scale: float, zero_point: int, qmin: int, qmax: int) -> float:
    """Mean squared error of ``x`` against its fake quantization on codes ``qmin..qmax``."""
    codes = np.clip(np.round(x / scale) + zero_point, qmin, qmax)
    return float(np.mean(((codes - zero_point) * scale - x) ** 2))


def mse_threshold(values: torch.Tensor | np.ndarray, bits: int, signed: bool) -> float:
    """The threshold ``f * max|x|`` (``f`` in :data:`MSE_FRACTIONS`) with the least mean squared
    error on the symmetric grid a quantizer with that threshold uses (signed: codes
    ``-2^(b-1)..2^(b-1)-1``; unsigned: ``0..2^b-1``, values below 0 counted at 0)."""
    x = as_float64(values)
    if not signed:
        x = np.clip(x, 0.0, None)
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak <= 0.0:
        return 0.0
    qmin, qmax = quant_range(bits, signed)
    errors = [_squared_error(x, f * peak / qmax, 0, qmin, qmax) for f in MSE_FRACTIONS]
    return float(MSE_FRACTIONS[int(np.argmin(errors))] * peak)


def mse_affine_range(values: torch.Tensor | np.ndarray, low: float, high: float) -> tuple[float, float]:
    """The range ``f * [min(low, 0), max(high, 0)]`` (``f`` in :data:`MSE_FRACTIONS`) whose 8-bit
    affine grid (codes 0..255, zero point rounded so that 0.0 is a code) has the least mean squared
    error on ``values``; both ends shrink together, so the zero point stays where it was."""
    x = as_float64(values)
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if high - low <= 0.0 or not x.size:
        return low, high
    errors = [_squared_error(x, *affine_grid(f * low, f * high), 0, 255) for f in MSE_FRACTIONS]
    best = float(MSE_FRACTIONS[int(np.argmin(errors))])
    return best * low, best * high


def threshold(
    values: torch.Tensor | np.ndarray, method: str, bits: int, signed: bool, percentile: float = 99.99
) -> float:
    """Dispatch on ``method`` (``minmax``, ``percentile``, ``kl`` or ``mse``)."""
    if method == "minmax":
        return minmax_threshold(values, signed)
    if method == "percentile":
        return percentile_threshold(values, signed, percentile)
    if method == "kl":
        return kl_threshold(values, bits, signed)
    if method == "mse":
        return mse_threshold(values, bits, signed)
    raise ValueError(f"unknown calibration method '{method}' (known: {', '.join(METHODS)})")
