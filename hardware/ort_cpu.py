"""The ``ort-cpu`` target: ONNX Runtime on this CPU, measured with fixed threads.

Sessions use ``intra_op_num_threads = threads`` (default 1), sequential execution and
``ORT_ENABLE_ALL`` for whole models, what a deployed session runs, and ``ORT_ENABLE_EXTENDED``
for the single layers of the latency table, where node names still map to the file and no
layout transform wraps a lone convolution in reorders
(:func:`hardware.runtime.measurement_session`). A latency is the
median of timed runs after warm-up, with the p90 and a flag when p90 / median exceeds
``max_spread`` (a busy machine; the number should not be trusted then).

A latency-table entry is measured once and then reused thousands of times, so one unlucky
moment on a shared machine would bias every prediction that uses it (measured: cached entries
up to 2x their re-measured value after a busy minute). A single layer's latency is therefore
the lowest of ``layer_repeats`` medians, each from its own short timing run: other processes
only ever add time to a measurement.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper
from torch import nn

from fxsculpt.hardware.int8_arithmetic import u8s8_saturates
from fxsculpt.hardware.layers import LayerSignature
from fxsculpt.hardware.runtime import (
    DEFAULT_MAX_SPREAD,
    Clock,
    MeasuredLevel,
    Timing,
    cpu_name,
    default_clock,
    measurement_session,
    ort_version,
    session_inputs,
    time_session,
)
from fxsculpt.hardware.single_layer import OPSET, build_single_layer
from fxsculpt.hardware.targets import ModelLatency, Target
from fxsculpt.ir.errors import BadInputError
from fxsculpt.ir.graph import IR


class OrtCpuTarget(Target):
    """ONNX Runtime's CPU execution provider on this machine, measured."""

    name = "ort-cpu"
    label = "measured on ONNX Runtime (CPU)"
    analytical = False

    def __init__(
        self,
        threads: int = 1,
        warmup: int = 5,
        max_seconds: float = 2.0,
        layer_max_seconds: float = 0.3,
        layer_repeats: int = 3,
        rel_tol: float = 0.01,
        max_spread: float = DEFAULT_MAX_SPREAD,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(threads)
        if threads < 1:
            raise BadInputError(f"--threads must be >= 1, got {threads}")
        self.warmup = warmup
        self.max_seconds = max_seconds
        self.layer_max_seconds = layer_max_seconds
        if layer_repeats < 1:
            raise BadInputError(f"layer_repeats must be >= 1, got {layer_repeats}")
        self.layer_repeats = layer_repeats
        self.rel_tol = rel_tol
        self.max_spread = max_spread
        self.clock: Clock = clock if clock is not None else default_clock(threads)
        if self.clock not in ("cpu", "wall"):
            raise BadInputError(f"clock must be 'cpu' or 'wall', got {self.clock!r}")
        what = "CPU time of the one inference thread" if self.clock == "cpu" else "wall clock"
        self.label = f"measured on ONNX Runtime (CPU), {what}"
        self._overhead: float | None = None

    def identity(self) -> dict[str, Any]:
        return {
            "cpu": cpu_name(),
            "onnxruntime": ort_version(),
            "threads": self.threads,
            "clock": self.clock,
            "layer_repeats": self.layer_repeats,
            "layer_optimization": "extended",
        }

    def int8_dot_saturates(self) -> bool:
        return u8s8_saturates()

    def time_model(
        self,
        model: str | Path | bytes,
        batch: int = 1,
        max_seconds: float | None = None,
        fallback_shape: tuple[int, ...] | None = None,
        optimization: MeasuredLevel = "all",
    ) -> Timing:
        """Median/p90 of ``model`` (a path or serialized bytes) at ``batch`` on random inputs."""
        session = measurement_session(model, self.threads, optimization=optimization)
        feeds = session_inputs(session, batch=batch, fallback_shape=fallback_shape)
        return time_session(
            session,
            feeds,
            warmup=self.warmup,
            max_seconds=self.max_seconds if max_seconds is None else max_seconds,
            rel_tol=self.rel_tol,
            max_spread=self.max_spread,
            clock=self.clock,
        )

    def _lowest_median(self, model: bytes, batch: int) -> float:
        """The lowest of ``layer_repeats`` medians of ``model`` (see the module docstring)."""
        return min(
            self.time_model(
                model, batch=batch, max_seconds=self.layer_max_seconds, optimization="extended"
            ).median_ms
            for _ in range(self.layer_repeats)
        )

    def layer_latency_ms(self, sig: LayerSignature, module: nn.Module | None = None) -> float:
        return self._lowest_median(build_single_layer(sig, module), batch=sig.in_shape[0])

    def time_interleaved(
        self,
        models: Mapping[str, str | Path | bytes],
        batch: int = 1,
        rounds: int = 5,
        max_seconds: float | None = None,
        fallback_shape: tuple[int, ...] | None = None,
        optimization: MeasuredLevel = "all",
    ) -> dict[str, list[Timing]]:
        """Every model timed once per round (:meth:`time_model`, at most ``max_seconds``, by default
        the target's), ``rounds``
        rounds in turn: a shared machine's drift slows all of them alike, so ratios and sums across
        them cancel it.

        Each round opens a fresh session per model. One session kept for every round would carry
        its own luck: two sessions of the same int8 file, timed in the same rounds, measured 0.39
        and 0.60 ms here (the cause was not pinned down); fresh sessions average that out. The
        order rotates from round to round, so no model always runs right after the same other
        one: in a fixed order (float, int8, the same float bytes again, float a third time) the
        copy right after the int8 file read 1.15x the float file and the last one 1.03x (timm
        mobilenetv3_small_050).
        """
        timings: dict[str, list[Timing]] = {key: [] for key in models}
        keys = list(models)
        for index in range(max(1, rounds)):
            shift = index % len(keys) if keys else 0
            for key in keys[shift:] + keys[:shift]:
                model = models[key]
                timings[key].append(
                    self.time_model(
                        model,
                        batch=batch,
                        max_seconds=max_seconds,
                        fallback_shape=fallback_shape,
                        optimization=optimization,
                    )
                )
        return timings

    def per_call_overhead_ms(self) -> float:
        """The latency of a one-element ReLU: the runtime's fixed cost per ``run`` call."""
        if self._overhead is None:
            self._overhead = self._lowest_median(overhead_model(), batch=1)
        return self._overhead

    def model_latency(self, ir: IR | None, onnx_path: Path | None, batch: int = 1) -> ModelLatency:
        if onnx_path is None:
            raise BadInputError("the ort-cpu target measures an ONNX file; none was given")
        fallback = tuple(ir.input_shape) if ir is not None else None
        timing = self.time_model(onnx_path, batch=batch, fallback_shape=fallback)
        return ModelLatency(
            median_ms=timing.median_ms,
            p90_ms=timing.p90_ms,
            spread_ok=timing.spread_ok,
            label=self.label,
            analytical=False,
            runs=timing.runs,
            details=timing.as_dict(),
        )


def overhead_model() -> bytes:
    """A serialized one-element ReLU: timing it measures the runtime's fixed cost per call."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "overhead",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    return bytes(model.SerializeToString())


def onnx_batch(path: Path) -> int | None:
    """The fixed batch size of an ONNX file's first input, ``None`` when symbolic."""
    model = onnx.load(str(path), load_external_data=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if dims and dims[0].HasField("dim_value"):
        return int(dims[0].dim_value)
    return None
