"""Export a policy's model and measure the file on the target: the hardware itself in HAQ's loop.

The latency tables predict a policy's latency in microseconds; a measured target can also
answer for the real thing, in seconds: set the policy on the search's IR (calibrated, as an
episode does), freeze a copy, export it exactly as the pipeline's ``export`` pass does
(dynamo, dynamic batch, one file) and time it. Files that are compared with each other (a
policy and the uniform 8-bit reference of a ratio budget, or the two calibration anchors) are
timed in interleaved rounds, each round timing every file once, and each gets the median of its
rounds: a shared machine that slows down for a while slows all of them alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from fxsculpt.hardware.runtime import Timing, median_of_rounds
from fxsculpt.quant.haq.enforce import Policy
from fxsculpt.quant.haq.env import QuantizeEnv
from fxsculpt.quant.insert import freeze


class FileTimer(Protocol):
    """What the meter needs of a measured target (:class:`hardware.ort_cpu.OrtCpuTarget`)."""

    def time_interleaved(
        self, models: Mapping[str, Path], batch: int = 1, rounds: int = 5, max_seconds: float | None = None
    ) -> dict[str, list[Timing]]: ...


class PolicyMeter:
    """Exports policies of ``env``'s IR into ``work_dir`` and times the files on ``target``.

    ``rounds`` interleaved rounds of at most ``max_seconds`` each per file (batch 1).
    ``exports`` counts the files written. With ``keep_weights`` a policy is set on the weights
    as they are (after the final fine-tune) instead of on the float weights the search restores.
    """

    def __init__(
        self, env: QuantizeEnv, target: FileTimer, work_dir: Path, rounds: int = 5, max_seconds: float = 0.4
    ) -> None:
        self.env = env
        self.target = target
        self.work_dir = Path(work_dir)
        self.rounds = max(1, rounds)
        self.max_seconds = max_seconds
        self.exports = 0
        self.keep_weights = False

    def export(self, policy: Policy, name: str) -> Path:
        """``policy`` set and calibrated on the env's IR, a frozen copy exported to ``work_dir/name.onnx``."""
        from fxsculpt.passes.export import export_onnx
        from fxsculpt.quant.export import export_settings

        if self.keep_weights:
            self.env.apply(policy)  # bits set on the weights as they are, scales calibrated
        else:
            self.env.prepare(policy)  # float weights back, bits set, activation scales calibrated
        model = self.env.ir.clone()
        freeze(model)
        model.gm.eval()
        opset, extra = export_settings(model.gm)
        path = self.work_dir / f"{name}.onnx"
        export_onnx(
            model.gm, model.example_input(batch=2).cpu(), path, opset=opset, dynamic_batch=True, **extra
        )
        self.exports += 1
        return path

    def measure(self, files: Mapping[str, Path]) -> dict[str, float]:
        """Median latency (ms, batch 1) of every file over interleaved rounds."""
        timings = self.target.time_interleaved(
            files, batch=1, rounds=self.rounds, max_seconds=self.max_seconds
        )
        return median_of_rounds(timings)
