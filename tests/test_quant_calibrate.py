"""Calibration thresholds against NumPy/SciPy references: min/max, percentile, KL divergence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fxsculpt.quant import calibrate as cal
from fxsculpt.quant.insert import calibration_method


def test_minmax_is_the_largest_magnitude() -> None:
    x = np.array([-5.0, 0.5, 3.0, -0.1])
    assert cal.minmax_threshold(x, signed=True) == 5.0
    assert cal.minmax_threshold(x, signed=False) == 3.0  # negatives are clipped to 0 when unsigned


def test_percentile_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_t(df=3, size=50_000)
    for p in (90.0, 99.0, 99.99):
        assert cal.percentile_threshold(x, True, p) == pytest.approx(np.percentile(np.abs(x), p))


def _reference_kl(hist: np.ndarray, cut: int, levels: int) -> float:
    """Independent loop implementation of Migacz (2017): P clipped at `cut`, Q merged to `levels`."""
    from scipy.stats import entropy

    p = hist[:cut].astype(float).copy()
    p[-1] += hist[cut:].sum()
    q = np.zeros(cut)
    bounds = [int(np.floor(j * cut / levels)) for j in range(levels)] + [cut]
    for j in range(levels):
        a, b = bounds[j], bounds[j + 1]
        nonzero = [i for i in range(a, b) if p[i] > 0]
        for i in nonzero:
            q[i] = hist[a:b].sum() / len(nonzero)  # the chunk's mass without the clipped tail
    total = q.sum()
    for i in range(cut):
        if p[i] > 0 and q[i] == 0:
            q[i] = 1e-4 * total / cut
    return float(entropy(p, q))  # scipy normalizes both


def test_kl_divergence_matches_a_loop_reference() -> None:
    rng = np.random.default_rng(1)
    hist = np.histogram(np.abs(rng.laplace(size=20_000)), bins=256)[0]
    for cut in (16, 37, 100, 256):
        assert cal.kl_divergence_at(hist, cut, 16) == pytest.approx(_reference_kl(hist, cut, 16), rel=1e-9)


def test_kl_threshold_is_the_reference_argmin_and_clips_outliers() -> None:
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(size=20_000), [40.0]])  # one far outlier
    bits, bins = 4, 2048
    t = cal.kl_threshold(x, bits, signed=True, bins=bins)
    hist, edges = np.histogram(np.abs(x), bins=bins, range=(0, np.abs(x).max()))
    levels = 2 ** (bits - 1)
    divergences = [_reference_kl(hist, cut, levels) for cut in range(levels, bins + 1)]
    best = levels + int(np.argmin(divergences))
    assert t == pytest.approx(edges[best])
    assert t < 10.0  # the outlier at 40 is clipped away

    # and clipping pays: lower error on the bulk of the data than min/max at 4 bits
    def mse(threshold: float) -> float:
        scale = threshold / (2 ** (bits - 1) - 1)
        q = np.clip(np.round(x[:-1] / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale
        return float(np.mean((q - x[:-1]) ** 2))

    assert mse(t) < mse(cal.minmax_threshold(x, True)) / 10


def test_auto_uses_kl_below_five_bits() -> None:
    assert calibration_method("auto", 4) == "kl"
    assert calibration_method("auto", 8) == "minmax"
    assert calibration_method("percentile", 4) == "percentile"


def test_unknown_method_is_refused() -> None:
    with pytest.raises(ValueError):
        cal.threshold(torch.ones(3), "entropy", 8, True)


def _torch_grid_error(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> float:
    """Mean squared error of torch's own fake quantization (an independent rounding/clipping)."""
    quantized = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
    return float(((quantized - x) ** 2).mean())


def test_mse_threshold_is_the_least_error_fraction_on_torch_grids() -> None:
    torch.manual_seed(0)
    x = torch.distributions.StudentT(3.0).sample((20_000,)).double()
    for bits, signed in ((8, True), (4, True), (8, False)):
        qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        seen = x if signed else x.clamp_min(0)
        peak = float(seen.abs().max())
        errors = [_torch_grid_error(seen, f * peak / qmax, 0, qmin, qmax) for f in cal.MSE_FRACTIONS]
        best = float(cal.MSE_FRACTIONS[int(np.argmin(errors))]) * peak
        got = cal.mse_threshold(x, bits, signed)
        assert got == pytest.approx(best)
        assert got < peak  # a heavy tail is worth clipping at these widths
    assert cal.threshold(x, "mse", 8, True) == pytest.approx(cal.mse_threshold(x, 8, True))


def test_mse_affine_range_shrinks_both_ends_to_the_least_error() -> None:
    torch.manual_seed(0)
    x = torch.cat([torch.randn(20_000) * 0.2 - 0.1, torch.tensor([-0.3, 40.0])]).double()  # one outlier
    low, high = float(x.min()), float(x.max())
    errors = []
    for f in cal.MSE_FRACTIONS:
        scale = f * (high - low) / 255
        errors.append(_torch_grid_error(x, scale, round(-f * low / scale), 0, 255))
    f = float(cal.MSE_FRACTIONS[int(np.argmin(errors))])
    got_low, got_high = cal.mse_affine_range(x, low, high)
    assert (got_low, got_high) == (pytest.approx(f * low), pytest.approx(f * high))
    assert f < 1.0
    assert cal.mse_affine_range(x, 0.0, 0.0) == (0.0, 0.0)
