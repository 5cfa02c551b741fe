"""Hardware targets: what a latency means and how it is obtained.

A :class:`Target` answers three questions: the latency of one layer (for latency tables),
the latency of a whole model (for budgets and benchmarks) and the identity that a cached
table entry must match (CPU, runtime version, threads, or the model's parameters).

- ``ort-cpu`` (:mod:`hardware.ort_cpu`): ONNX Runtime on this machine's CPU, measured.
- ``bitserial`` (:mod:`hardware.bitserial`): an analytical roofline of a bit-serial /
  bit-fusion accelerator; every report says "analytical model, not a measurement".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from fxsculpt.hardware.layers import LayerSignature
from fxsculpt.ir.errors import BadInputError
from fxsculpt.ir.graph import IR


@dataclass
class ModelLatency:
    """A whole model's latency on a target; ``analytical`` when computed, not measured."""

    median_ms: float
    p90_ms: float
    spread_ok: bool
    label: str
    analytical: bool
    runs: int = 0
    details: dict[str, Any] = field(default_factory=dict)


class Target(ABC):
    """A place a model runs on; subclasses set ``name`` and ``label``."""

    name: str = ""
    #: Shown next to every number this target produces.
    label: str = ""
    analytical: bool = False

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """Everything a cached latency depends on besides the layer (part of the cache key)."""

    @abstractmethod
    def layer_latency_ms(self, sig: LayerSignature, module: nn.Module | None = None) -> float:
        """Latency of one layer alone (measured or computed); ``module`` for ``module:`` signatures."""

    def per_call_overhead_ms(self) -> float:
        """Fixed cost of one inference call that every single-layer latency includes (0 if none)."""
        return 0.0

    @abstractmethod
    def model_latency(self, ir: IR | None, onnx_path: Path | None, batch: int = 1) -> ModelLatency:
        """The whole model's latency at ``batch``; a measured target needs ``onnx_path``."""

    def int8_dot_saturates(self) -> bool:
        """Whether this target's int8 kernels add product pairs in saturating 16-bit arithmetic.

        Where they do, 8-bit weights must keep to 7-bit codes for the file to compute what the
        quantized model computes (:mod:`hardware.int8_arithmetic`). False unless a target says so.
        """
        return False

    def describe(self) -> dict[str, Any]:
        return {"target": self.name, "label": self.label, **self.identity()}


TARGET_NAMES = ("ort-cpu", "bitserial")


def get_target(name: str, threads: int = 1, **options: Any) -> Target:
    """The target called ``name`` with ``threads`` and target-specific ``options``."""
    if name == "ort-cpu":
        from fxsculpt.hardware.ort_cpu import OrtCpuTarget

        return OrtCpuTarget(threads=threads, **options)
    if name == "bitserial":
        from fxsculpt.hardware.bitserial import BitserialTarget

        return BitserialTarget(threads=threads, **options)
    raise BadInputError(f"unknown hardware target '{name}' (known: {', '.join(TARGET_NAMES)})")
