"""ONNX Runtime sessions configured for measurement, and a stable timing loop.

Every measurement in ``hardware/`` goes through :func:`measurement_session` (fixed
``intra_op_num_threads``, sequential execution) and :func:`time_callable` (warm-up, then timed
runs until the median is stable or a time cap is reached; median and p90 reported with a
spread flag). Whole models are timed at ``ORT_ENABLE_ALL``, the level a deployed session gets
by default: its NCHWc layout transform makes float convolutions up to 5x faster than at
``ORT_ENABLE_EXTENDED`` (timm mobilenetv2_050 at 32 px: 0.08 against 0.43 ms; int8 0.08
against 0.10 ms), so int8 is judged against the float model a user really runs. The profiler
and the single layers of the latency tables ask for ``ORT_ENABLE_EXTENDED``, where node names
still map back to the ONNX file and QDQ fusions already happen (TOOLCHAIN.md).
"""

from __future__ import annotations

import functools
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort

from fxsculpt.ir.errors import BadInputError, first_line

#: The graph optimization levels a measurement session may use (:func:`measurement_session`).
MeasuredLevel = Literal["extended", "all"]
_LEVELS = {
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

#: p90 / median above this means the timings are too noisy to trust (shared machine, throttling).
DEFAULT_MAX_SPREAD = 1.5


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU model string (``/proc/cpuinfo``'s ``model name``, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def ort_version() -> str:
    return str(ort.__version__)


def measurement_session(
    model: str | Path | bytes,
    threads: int = 1,
    profile_prefix: str | None = None,
    optimized_model_path: str | Path | None = None,
    optimization: MeasuredLevel = "all",
) -> ort.InferenceSession:
    """A CPU session with ``threads`` intra-op threads, one inter-op thread, sequential execution.

    ``optimization`` is the graph optimization level (see the module docstring);
    ``profile_prefix`` turns ONNX Runtime's profiler on (JSON written at ``end_profiling``);
    ``optimized_model_path`` saves the graph ORT actually runs (used to see which nodes fused).
    """
    if threads < 1:
        raise BadInputError(f"threads must be >= 1, got {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = _LEVELS[optimization]
    options.log_severity_level = 3
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        first = first_line(exc)
        where = "the ONNX model" if isinstance(model, bytes) else str(model)
        raise BadInputError(f"ONNX Runtime cannot load {where}: {first}") from exc


_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}


def session_inputs(
    session: ort.InferenceSession,
    batch: int = 1,
    fallback_shape: tuple[int, ...] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Deterministic random feeds for every input of ``session``.

    Symbolic dimensions take ``batch`` for the first axis and ``fallback_shape`` (or 1)
    elsewhere; a fixed batch axis is kept as the file says.
    """
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for arg in session.get_inputs():
        shape: list[int] = []
        for axis, dim in enumerate(arg.shape):
            if isinstance(dim, int) and dim > 0:
                shape.append(dim)
            elif axis == 0:
                shape.append(batch)
            elif fallback_shape is not None and axis < len(fallback_shape):
                shape.append(int(fallback_shape[axis]))
            else:
                shape.append(1)
        dtype: Any = _ORT_TYPES.get(arg.type)
        if dtype is None:
            raise BadInputError(f"cannot feed ONNX input '{arg.name}' of type {arg.type}")
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            low = -128 if dtype == np.int8 else 0  # wider integers are usually indices: keep them >= 0
            feeds[arg.name] = rng.integers(low, min(info.max, 255) + 1, size=shape).astype(dtype)
        else:
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def batch_of(session: ort.InferenceSession) -> int | None:
    """The fixed batch size of the first input, or ``None`` when it is symbolic."""
    dim = session.get_inputs()[0].shape[0] if session.get_inputs()[0].shape else None
    return dim if isinstance(dim, int) and dim > 0 else None


Clock = Literal["cpu", "wall"]


@dataclass
class Timing:
    """Latency of repeated runs in milliseconds, on the chosen ``clock`` and on the wall clock.

    ``median_ms``/``p90_ms``/``min_ms``/``mean_ms``/``spread`` are on ``clock``;
    ``wall_median_ms``/``wall_p90_ms`` are always wall-clock, ``cpu_median_ms`` always CPU time.
    """

    median_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    runs: int
    stable: bool
    spread: float  # p90 / median
    spread_ok: bool
    clock: str = "wall"
    wall_median_ms: float = 0.0
    wall_p90_ms: float = 0.0
    cpu_median_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float):
                out[key] = round(value, 5)
        return out


def median_of_rounds(timings: Mapping[str, Sequence[Timing]]) -> dict[str, float]:
    """Per model, the median over interleaved rounds of each round's median (ms)."""
    return {key: statistics.median(t.median_ms for t in rounds) for key, rounds in timings.items()}


def paired_ratios(timings: Mapping[str, Sequence[Timing]], baseline: str) -> dict[str, float]:
    """Per model, the median over interleaved rounds of its round median ÷ ``baseline``'s in that round.

    On a shared machine the speed drifts from round to round (seen here: the same file 0.30 ms in one
    round, 0.43 ms a few rounds later); a ratio taken within each round, where the two files ran
    moments apart, cancels the drift that a ratio of two medians over all rounds keeps.
    """
    base = [t.median_ms for t in timings[baseline]]
    return {
        key: statistics.median(t.median_ms / b for t, b in zip(rounds, base, strict=True))
        for key, rounds in timings.items()
    }


def rounds_faster(timings: Mapping[str, Sequence[Timing]], baseline: str) -> dict[str, int]:
    """Per model, in how many interleaved rounds its median beat ``baseline``'s in the same round."""
    base = [t.median_ms for t in timings[baseline]]
    return {
        key: sum(t.median_ms < b for t, b in zip(rounds, base, strict=True))
        for key, rounds in timings.items()
    }


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) with linear interpolation, as ``numpy.percentile`` does."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q * 100.0))


def default_clock(threads: int) -> Clock:
    """``"cpu"`` for one thread (see :func:`time_callable`), ``"wall"`` otherwise."""
    return "cpu" if threads == 1 else "wall"


def time_callable(
    fn: Callable[[], Any],
    warmup: int = 5,
    min_runs: int = 10,
    max_runs: int = 2000,
    max_seconds: float = 2.0,
    rel_tol: float = 0.01,
    max_spread: float = DEFAULT_MAX_SPREAD,
    chunk: int = 10,
    clock: Clock = "wall",
) -> Timing:
    """Time ``fn``: ``warmup`` untimed calls, then chunks of timed calls.

    Stops when the running median moved by at most ``rel_tol`` (relative) over the last
    chunk and at least ``min_runs`` were timed, or after ``max_seconds`` / ``max_runs``.
    ``stable`` says whether the median converged rather than hitting a cap.

    Every run is timed on the wall clock and in CPU time of the calling thread
    (``time.thread_time``). With ``intra_op_num_threads = 1`` ONNX Runtime runs every kernel
    on the calling thread, so its CPU time is the latency the model has when it has the core
    to itself: on a shared, oversubscribed machine the wall clock also counts the time the OS
    gave to other processes (measured here: 99 ms wall for 21 ms of CPU at a load of 14 on 2
    cores). ``clock="cpu"`` makes that the reported latency; ``"wall"`` is the plain one.
    """
    for _ in range(max(warmup, 0)):
        fn()
    wall: list[float] = []
    cpu: list[float] = []
    chosen = cpu if clock == "cpu" else wall
    start = time.perf_counter()
    previous: float | None = None
    stable = False
    while len(wall) < max_runs:
        for _ in range(chunk):
            c0 = time.thread_time()
            t0 = time.perf_counter()
            fn()
            wall.append((time.perf_counter() - t0) * 1000.0)
            cpu.append((time.thread_time() - c0) * 1000.0)
        median = statistics.median(chosen)
        if len(chosen) >= min_runs and previous is not None and abs(median - previous) <= rel_tol * previous:
            stable = True
            break
        previous = median
        if time.perf_counter() - start > max_seconds:
            break
    median = statistics.median(chosen)
    p90 = percentile(chosen, 0.9)
    spread = p90 / median if median > 0 else 1.0
    return Timing(
        median_ms=median,
        p90_ms=p90,
        min_ms=min(chosen),
        mean_ms=statistics.fmean(chosen),
        runs=len(chosen),
        stable=stable,
        spread=spread,
        spread_ok=spread <= max_spread,
        clock=clock,
        wall_median_ms=statistics.median(wall),
        wall_p90_ms=percentile(wall, 0.9),
        cpu_median_ms=statistics.median(cpu),
    )


def time_session(
    session: ort.InferenceSession, feeds: dict[str, np.ndarray], **timing_options: Any
) -> Timing:
    """:func:`time_callable` on ``session.run(None, feeds)``."""
    return time_callable(lambda: session.run(None, feeds), **timing_options)
