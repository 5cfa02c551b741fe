"""Layer-by-layer parity of an exported quantized model: ONNX Runtime's integer kernels against PyTorch.

End-to-end top-1 agreement is a poor judge of a quantized export. Per layer, ONNX Runtime's
integer kernels compute what fake quantization computes, except that a value within a float
rounding error of a half-code boundary can round either way (PyTorch divides a float32
convolution by the scale, ONNX Runtime multiplies an int32 accumulator by a float32
multiplier). On a trained model those rare one-code steps fade; in a deep network with random
weights they are amplified layer after layer until many near-tied predictions flip (measured on
timm's mobilenetv2_050: one code in 10^5 differs per layer, yet top-1 agreement fell below 90%).

So the check here *teacher-forces* PyTorch with ONNX Runtime's activations. Every activation
QuantizeLinear of the file becomes an extra output; PyTorch runs the same inputs with each of its
activation quantizers replaced by ONNX Runtime's codes at that point, and each quantizer's own
codes (computed from ONNX Runtime's inputs) are compared with ONNX Runtime's. A faithful export
differs by at most one code anywhere; a one-code step counts as a tie when PyTorch's unrounded
value lies within :data:`BOUNDARY_TOLERANCE` codes of a half-code boundary, and at most
:data:`MAX_OFF_BOUNDARY_FRACTION` of any quantizer's values may step away from one; the forced
model outputs match ONNX Runtime's to float tolerance. A wrong scale, layout or zero point shows
up at its own layer, by name, as steps away from the boundaries.

Ties are not rare everywhere: where two common input codes combine to within a float rounding
error of a half code, every such value is a tie. On timm's mobilenetv2_050 (trained 10 epochs) a
residual QLinearAdd had scale ratios r1, r2 with 6·r1 − 4·r2 = −0.5000015: PyTorch rounds
127.4999985 to 127, ONNX Runtime's fixed-point QLinearAdd (22-bit multipliers) to 128, on 0.35% of
that layer's values, all within 1e-5 codes of the boundary.

The extra outputs are added to a copy of the file; ONNX Runtime fuses the same QDQ groups into
integer kernels around them (a QuantizeLinear output stays available as the fused kernel's output).
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fxsculpt.quant.modules import ActQuantizer

#: A one-code step is a tie when PyTorch's unrounded code is this close to a half-code boundary:
#: float32 accumulation in PyTorch and ONNX Runtime's requantization (a float32 multiplier, or
#: QLinearAdd's fixed-point one) can round such values either way.
BOUNDARY_TOLERANCE = 1e-3
#: Largest fraction of one quantizer's codes allowed a one-code step away from a half-code boundary
#: (float32 accumulation error of a long dot product can exceed :data:`BOUNDARY_TOLERANCE`, rarely).
MAX_OFF_BOUNDARY_FRACTION = 1e-3
#: Largest code difference allowed anywhere (a tie moves a value by one code, never more).
MAX_CODE_STEP = 1


@dataclass
class LayerCodes:
    """How one activation quantizer's codes compare: ONNX Runtime against PyTorch on the same inputs."""

    name: str
    values: int = 0
    off_by_one: int = 0
    #: of ``off_by_one``, the steps where PyTorch's unrounded value was at a half-code boundary
    at_boundary: int = 0
    max_step: int = 0

    @property
    def tie_fraction(self) -> float:
        """Share of values one code apart, ties at a boundary included."""
        return self.off_by_one / self.values if self.values else 0.0

    @property
    def off_boundary_fraction(self) -> float:
        """Share of values one code apart although PyTorch's value was not at a half-code boundary."""
        return (self.off_by_one - self.at_boundary) / self.values if self.values else 0.0

    @property
    def faithful(self) -> bool:
        return self.max_step <= MAX_CODE_STEP and self.off_boundary_fraction <= MAX_OFF_BOUNDARY_FRACTION


@dataclass
class KernelParity:
    """The outcome of :func:`kernel_parity`; ``None`` from it when the file's quantizers cannot be matched."""

    layers: list[LayerCodes]
    forced_max_abs_diff: float
    tolerance: float
    samples: int
    unmatched: list[str] = field(default_factory=list)

    @property
    def worst(self) -> LayerCodes | None:
        unfaithful = [layer for layer in self.layers if not layer.faithful]
        pool = unfaithful or self.layers
        return (
            max(pool, key=lambda layer: (layer.max_step, layer.off_boundary_fraction, layer.tie_fraction))
            if pool
            else None
        )

    @property
    def holds(self) -> bool:
        return all(layer.faithful for layer in self.layers) and self.forced_max_abs_diff <= self.tolerance

    def summary(self) -> dict[str, Any]:
        worst = self.worst
        return {
            "rule": (
                f"teacher-forced per quantizer: codes differ by <= {MAX_CODE_STEP}, and by one on <= "
                f"{MAX_OFF_BOUNDARY_FRACTION:g} of values away from a half-code boundary (within "
                f"{BOUNDARY_TOLERANCE:g} codes: a tie); forced outputs within tolerance"
            ),
            "quantizers": len(self.layers),
            "values_compared": sum(layer.values for layer in self.layers),
            "off_by_one": sum(layer.off_by_one for layer in self.layers),
            "off_by_one_at_boundary": sum(layer.at_boundary for layer in self.layers),
            "max_code_step": max((layer.max_step for layer in self.layers), default=0),
            "worst_quantizer": None
            if worst is None
            else {
                "name": worst.name,
                "max_step": worst.max_step,
                "tie_fraction": worst.tie_fraction,
                "off_boundary_fraction": worst.off_boundary_fraction,
            },
            "forced_max_abs_diff": self.forced_max_abs_diff,
            "tolerance": self.tolerance,
            "holds": self.holds,
        }


def _scopes_of(node: Any) -> list[str]:
    """The module scopes an exported node came from, outermost first (torch's ``name_scopes``).

    The exporter may or may not put a wrapper's ``''`` scope first, so callers look the module up
    in the list rather than at a fixed position.
    """
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                return [str(scope) for scope in ast.literal_eval(prop.value)]
            except (ValueError, SyntaxError):
                return []
    return []


def activation_quantize_nodes(model: Any, quantizers: set[str]) -> dict[str, Any]:
    """Module name → the file's QuantizeLinear node of that activation quantizer (only 1:1 matches)."""
    constants = {t.name for t in model.graph.initializer}
    found: dict[str, list[Any]] = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in constants:
            continue
        owner = next((scope for scope in _scopes_of(node) if scope in quantizers), None)
        if owner is not None:
            found.setdefault(owner, []).append(node)
    return {name: nodes[0] for name, nodes in found.items() if len(nodes) == 1}


def _zero_point(model: Any, node: Any) -> tuple[int, int]:
    """(ONNX element type, value) of a QuantizeLinear's zero point (uint8 0 when it has none)."""
    import onnx
    from onnx import numpy_helper

    if len(node.input) < 3 or not node.input[2]:
        return onnx.TensorProto.UINT8, 0
    for t in model.graph.initializer:
        if t.name == node.input[2]:
            return t.data_type, int(numpy_helper.to_array(t).reshape(-1)[0])
    for n in model.graph.node:  # a Constant node
        if n.op_type == "Constant" and n.output[0] == node.input[2]:
            tensor = n.attribute[0].t
            return tensor.data_type, int(numpy_helper.to_array(tensor).reshape(-1)[0])
    raise ValueError(f"zero point {node.input[2]} of {node.name} is not a constant")


def kernel_parity(
    gm: nn.Module, path: str | Path, batches: Sequence[torch.Tensor], atol: float, threads: int = 1
) -> KernelParity | None:
    """Teacher-forced comparison of the quantized file at ``path`` with ``gm`` (see the module text).

    ``None`` when some calibrated quantizer of ``gm`` has no QuantizeLinear of its own in the file
    (then only end-to-end comparison is possible).
    """
    import onnx

    from fxsculpt.quant.export import session as ort_session

    quantizers = {
        name: m
        for name, m in gm.named_modules()
        if isinstance(m, ActQuantizer) and m.bits is not None and m.calibrated
    }
    model = onnx.load(str(path))
    nodes = activation_quantize_nodes(model, set(quantizers))
    unmatched = sorted(set(quantizers) - set(nodes))
    if unmatched or not nodes:
        return None
    zero_points = {}
    for name, node in nodes.items():
        elem_type, zp = _zero_point(model, node)
        zero_points[name] = zp
        model.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], elem_type, None))
    sess = _session_from_proto(model, threads, ort_session)
    output_names = [o.name for o in sess.get_outputs()]
    first_outputs = len(output_names) - len(nodes)
    stats = {name: LayerCodes(name) for name in nodes}
    forced_worst, scale, samples = 0.0, 1.0, 0
    was_training = gm.training
    gm.eval()
    try:
        for x in batches:
            got = sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(x.cpu().numpy())})
            by_name = dict(zip(output_names, got, strict=True))
            ort_codes = {
                name: by_name[node.output[0]].astype(np.int64) - zero_points[name]
                for name, node in nodes.items()
            }
            forced = _forced_outputs(gm, quantizers, ort_codes, stats, x)
            for expected, actual in zip(forced, got[:first_outputs], strict=False):
                diff = np.abs(expected.astype(np.float64) - np.asarray(actual, dtype=np.float64))
                if diff.size:
                    forced_worst = max(forced_worst, float(diff.max()))
                    scale = max(scale, float(np.abs(expected).max()))
            samples += int(x.shape[0])
    finally:
        gm.train(was_training)
    return KernelParity(list(stats.values()), forced_worst, atol * scale, samples)


def _session_from_proto(model: Any, threads: int, make_session: Any) -> Any:
    """A session of ``model`` (an in-memory ``ModelProto``) made by ``make_session(path, threads)``."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "with_codes.onnx"
        onnx.save(model, str(copy))
        return make_session(copy, threads)


def _forced_outputs(
    gm: nn.Module,
    quantizers: dict[str, ActQuantizer],
    ort_codes: dict[str, np.ndarray],
    stats: dict[str, LayerCodes],
    x: torch.Tensor,
) -> list[np.ndarray]:
    """Run ``gm`` on ``x`` with every matched quantizer's output replaced by ONNX Runtime's codes."""
    from fxsculpt.ir.verify import outputs_of

    def force(name: str) -> Any:
        def hook(module: ActQuantizer, inputs: Any, out: torch.Tensor) -> torch.Tensor:
            theirs = ort_codes[name]
            ours = torch.round(out.detach().double() / module.scale).cpu().numpy().astype(np.int64)
            if ours.shape != theirs.shape:
                raise ValueError(f"{name}: ONNX Runtime codes of shape {theirs.shape}, PyTorch {ours.shape}")
            step = np.abs(ours - theirs)
            unrounded = (inputs[0].detach().double() / module.scale).cpu().numpy()
            at_boundary = np.abs(unrounded - np.floor(unrounded) - 0.5) <= BOUNDARY_TOLERANCE
            record = stats[name]
            record.values += int(step.size)
            record.off_by_one += int((step == 1).sum())
            record.at_boundary += int(((step == 1) & at_boundary).sum())
            record.max_step = max(record.max_step, int(step.max()) if step.size else 0)
            return torch.from_numpy(theirs.astype(np.float64) * module.scale).to(out.dtype).to(out.device)

        return hook

    handles = [quantizers[name].register_forward_hook(force(name)) for name in ort_codes]
    try:
        return [t.detach().cpu().float().numpy() for t in outputs_of(gm, x)]  # type: ignore[arg-type]
    finally:
        for handle in handles:
            handle.remove()
