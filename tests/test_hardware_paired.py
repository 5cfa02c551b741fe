"""Interleaved timing and the drift-cancelling prediction check (hardware/paired_prediction.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import fxsculpt.hardware.runtime as runtime
from fxsculpt.hardware.layers import layer_groups
from fxsculpt.hardware.ort_cpu import OrtCpuTarget
from fxsculpt.hardware.paired_prediction import paired_prediction
from fxsculpt.ir.graph import IR
from fxsculpt.passes.export import export_onnx


def _timing(ms: float) -> runtime.Timing:
    return runtime.Timing(ms, ms, ms, ms, 10, True, 1.0, True)


def _two_same_convs() -> IR:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
    ).eval()
    return IR.from_module(model, (1, 4, 8, 8))


def test_interleaved_rounds_time_every_model_once_per_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """The timing log shows rounds a b, b a, a b (never all of a's timings first, and the order
    rotates so neither always follows the other); each timing is a time_model call of its own (a
    fresh session), at the batch asked for."""
    target = OrtCpuTarget(threads=1)
    log: list[tuple[object, int]] = []

    def fake_time_model(model: object, batch: int = 1, **_: object) -> runtime.Timing:
        log.append((model, batch))
        return _timing(1.0)

    monkeypatch.setattr(target, "time_model", fake_time_model)
    timings = target.time_interleaved({"a": b"A", "b": b"B"}, batch=4, rounds=3)
    assert [len(v) for v in timings.values()] == [3, 3]
    assert log == [(b"A", 4), (b"B", 4), (b"B", 4), (b"A", 4), (b"A", 4), (b"B", 4)]


def test_a_drift_that_slows_everything_alike_cancels(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Round 2 runs twice as slow as round 1. Per round: overhead o, each of the two identical conv
    layers t, model m; prediction o + 2 (t − o) by hand. A table built in round 1 against the model
    measured in round 2 would be off by −50%; the paired error is 0 in both rounds."""
    ir = _two_same_convs()
    path = tmp_path / "m.onnx"
    export_onnx(ir.gm, ir.example_input(batch=1), path)
    target = OrtCpuTarget(threads=1)
    per_round = [{"o": 0.1, "t": 0.5, "m": 0.9}, {"o": 0.2, "t": 1.0, "m": 1.8}]
    seen: dict[str, object] = {}

    def fake(models: dict[str, object], batch: int = 1, rounds: int = 5, **_: object):
        seen.update(models)
        out: dict[str, list[runtime.Timing]] = {}
        for key in models:
            kind = "o" if key == "overhead" else "m" if key == "model" else "t"
            out[key] = [_timing(r[kind]) for r in per_round]
        return out

    monkeypatch.setattr(target, "time_interleaved", fake)
    result = paired_prediction(ir, path, target, rounds=2)
    assert result.single_layer_models == 1  # one signature, counted twice in the sum
    assert len([k for k in seen if k.startswith("layer:")]) == 1
    assert result.round_predicted_ms == pytest.approx([0.1 + 2 * 0.4, 0.2 + 2 * 0.8])
    assert result.round_errors == pytest.approx([0.0, 0.0])
    assert result.error == pytest.approx(0.0)
    assert result.round_predicted_ms[0] / result.round_measured_ms[1] - 1 == pytest.approx(-0.5)


def test_paired_prediction_on_the_runtime(tmp_path: Path) -> None:
    """On ONNX Runtime itself: one single-layer model per distinct conv+ReLU signature, positive
    finite times, and each round's prediction equals o + Σ (t − o) of that round's numbers."""
    ir = _two_same_convs()
    path = tmp_path / "m.onnx"
    export_onnx(ir.gm, ir.example_input(batch=2), path, dynamic_batch=True)
    target = OrtCpuTarget(threads=1, warmup=1)
    result = paired_prediction(ir, path, target, batch=2, rounds=2, max_seconds=0.02)
    signatures = {g.signature.key() for g in layer_groups(ir) if g.signature is not None}
    assert result.single_layer_models == len(signatures) == 1
    assert len(result.round_errors) == 2
    assert all(math.isfinite(e) for e in result.round_errors)
    assert result.measured_ms > 0 and result.predicted_ms >= result.overhead_ms > 0


def test_haq_meter_times_its_files_in_interleaved_rounds(tmp_path: Path) -> None:
    """HAQ's meter asks the target for one interleaved timing of all files and keeps each file's
    median over the rounds: a recorded target answers with round medians 3, 1, 2 ms → 2 ms."""
    from fxsculpt.quant.haq.meter import PolicyMeter

    asked: list[tuple[list[str], int]] = []

    class Recorded:
        def time_interleaved(self, models, batch=1, rounds=5, max_seconds=0.4):  # type: ignore[no-untyped-def]
            asked.append((sorted(models), rounds))
            return {k: [_timing(3.0), _timing(1.0), _timing(2.0)] for k in models}

    meter = PolicyMeter(None, Recorded(), tmp_path, rounds=3)  # type: ignore[arg-type]
    assert meter.measure({"policy": tmp_path / "p.onnx", "reference": tmp_path / "r.onnx"}) == {
        "policy": 2.0,
        "reference": 2.0,
    }
    assert asked == [(["policy", "reference"], 3)]


def test_paired_ratios_cancel_a_drift_that_the_ratio_of_medians_keeps():
    # The machine slows down after round 1; b is 10% slower than a in every round.
    a = [1.0, 2.0, 2.0, 2.0, 1.0]
    b = [1.1, 2.2, 2.2, 2.2, 1.1]
    c = [0.9, 2.4, 2.4, 2.4, 0.9]  # faster than a only in the fast rounds
    timings = {k: [_timing(ms) for ms in v] for k, v in {"a": a, "b": b, "c": c}.items()}
    ratios = runtime.paired_ratios(timings, "a")
    # hand count: b/a is 1.1 in each round; c/a per round is 0.9, 1.2, 1.2, 1.2, 0.9 (median 1.2)
    assert ratios["a"] == 1.0
    assert math.isclose(ratios["b"], 1.1)
    assert math.isclose(ratios["c"], 1.2)
    with pytest.raises(ValueError):  # rounds must pair up
        runtime.paired_ratios({"a": timings["a"], "d": timings["b"][:3]}, "a")


def test_rounds_faster_counts_the_rounds_each_file_beat_the_baseline():
    a = [1.0, 2.0, 2.0, 2.0, 1.0]
    c = [0.9, 2.4, 2.4, 1.9, 0.9]  # by hand: faster in rounds 1, 4 and 5
    timings = {k: [_timing(ms) for ms in v] for k, v in {"a": a, "c": c}.items()}
    assert runtime.rounds_faster(timings, "a") == {"a": 0, "c": 3}


def test_a_quantized_file_replaces_float_only_when_it_wins_nearly_every_round():
    from fxsculpt.passes.quantize import ROUNDS_FLOAT_MAY_WIN, choose_candidate

    assert ROUNDS_FLOAT_MAY_WIN == 1
    ratio = {"float": 1.0, "placed": 0.97, "all_int8": 0.9}
    # all_int8 has the lowest median but lost 3 of 7 rounds: noise; placed won 6 of 7
    assert choose_candidate(ratio, {"float": 0, "placed": 6, "all_int8": 4}, 7, {}) == "placed"
    assert choose_candidate(ratio, {"float": 0, "placed": 7, "all_int8": 7}, 7, {}) == "all_int8"
    assert choose_candidate(ratio, {"float": 0, "placed": 5, "all_int8": 5}, 7, {}) == "float"
    # a median of exactly 1 is a tie, whatever the rounds: float
    assert choose_candidate({"float": 1.0, "placed": 1.0}, {"float": 0, "placed": 7}, 7, {}) == "float"
    # float over a size budget: the fastest of the rest, however close
    excluded = {"float": "misses the budget: size 9 > 5"}
    assert choose_candidate(ratio, {"float": 0, "placed": 2, "all_int8": 3}, 7, excluded) == "all_int8"
