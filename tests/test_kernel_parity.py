"""The teacher-forced kernel check (quant/kernel_parity.py) against ONNX Runtime's own QLinearAdd.

The scales are the ones of the residual add of timm's mobilenetv2_050 (trained 10 epochs) where
the check used to refuse a faithful file: 6·(s_a/s_c) − 4·(s_b/s_c) = −0.5000015, so the common
code pair (+6, −4) lands 1.5e-6 codes below a half-code boundary. PyTorch rounds it down, ONNX
Runtime's fixed-point QLinearAdd up. The reference is float64 arithmetic on ONNX Runtime's codes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import fx, nn

from fxsculpt.quant import export as qe
from fxsculpt.quant.kernel_parity import BOUNDARY_TOLERANCE, activation_quantize_nodes, kernel_parity
from fxsculpt.quant.modules import ActQuantizer

SCALE_A, SCALE_B, SCALE_OUT = 0.061704810708761215, 0.11335903406143188, 0.1664140373468399


class QuantizedAdd(nn.Module):
    """Channel 0 and channel 1 of the input, each quantized, added, the sum quantized."""

    def __init__(self) -> None:
        super().__init__()
        self.aq, self.bq, self.oq = (ActQuantizer(8, signed=True) for _ in range(3))
        for quantizer, scale in ((self.aq, SCALE_A), (self.bq, SCALE_B), (self.oq, SCALE_OUT)):
            quantizer.scale, quantizer.calibrated = scale, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.oq(self.aq(x[:, :1]) + self.bq(x[:, 1:]))


class KeepQuantizers(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ActQuantizer) or super().is_leaf_module(m, qualname)


def _traced() -> fx.GraphModule:
    model = QuantizedAdd().eval()
    return fx.GraphModule(model, KeepQuantizers().trace(model))


def _inputs(seed: int = 0) -> torch.Tensor:
    """Codes on the input grids: the tied pair (+6, −4) on a quarter of the values, the rest random."""
    rng = np.random.default_rng(seed)
    a = rng.integers(-40, 40, size=(64, 1, 8, 8))
    b = rng.integers(-40, 40, size=(64, 1, 8, 8))
    tied = rng.random(a.shape) < 0.25
    a[tied], b[tied] = 6, -4
    return torch.from_numpy(np.concatenate([a * SCALE_A, b * SCALE_B], axis=1).astype(np.float32))


def _ort_codes(path: Path, x: torch.Tensor) -> np.ndarray:
    """ONNX Runtime's codes of the sum (zero point removed), from the fused file."""
    model = onnx.load(str(path))
    node = activation_quantize_nodes(model, {"oq"})["oq"]
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.UINT8, None)
    )
    patched = path.with_name("with_sum.onnx")
    onnx.save(model, str(patched))
    sess = qe.session(patched)
    outputs = [o.name for o in sess.get_outputs()]
    (codes,) = sess.run([outputs[-1]], {sess.get_inputs()[0].name: x.numpy()})
    return codes.astype(np.int64) - 128


def test_ties_at_a_half_code_boundary_are_not_a_mismatch(tmp_path: Path) -> None:
    gm, x = _traced(), _inputs()
    path = qe.export_quantized(gm, x[:2], tmp_path / "add.onnx")
    assert qe.optimized_op_counts(path)["QLinearAdd"] == 1

    # reference: the exact sum of the input codes, in float64, against ONNX Runtime's sum codes
    a = np.round(x[:, :1].double().numpy() / SCALE_A)
    b = np.round(x[:, 1:].double().numpy() / SCALE_B)
    exact = (SCALE_A * a + SCALE_B * b) / SCALE_OUT
    theirs = _ort_codes(path, x)
    differs = theirs != np.round(exact)
    near_half = np.abs(exact - np.floor(exact) - 0.5) <= BOUNDARY_TOLERANCE
    assert differs.sum() > 0.1 * differs.size  # ONNX Runtime rounds the tied pair the other way
    assert not (differs & ~near_half).any()

    parity = kernel_parity(gm, path, [x], atol=1e-4)
    assert parity is not None and parity.holds
    (sum_codes,) = [layer for layer in parity.layers if layer.name == "oq"]
    assert sum_codes.off_by_one == sum_codes.at_boundary == int(differs.sum())
    assert sum_codes.off_boundary_fraction == 0.0
    assert sum_codes.tie_fraction > 0.1  # the old rule (one-code steps on <= 0.1%) refused it
    assert parity.summary()["off_by_one_at_boundary"] == int(differs.sum())


@pytest.mark.parametrize("factor", [1.01, 0.99])
def test_a_wrong_output_scale_is_still_refused(tmp_path: Path, factor: float) -> None:
    gm, x = _traced(), _inputs(seed=1)
    path = qe.export_quantized(gm, x[:2], tmp_path / "add.onnx")
    model = onnx.load(str(path))
    node = activation_quantize_nodes(model, {"oq"})["oq"]
    (scale,) = [t for t in model.graph.initializer if t.name == node.input[1]]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(factor), scale.name))
    onnx.save(model, str(path))

    parity = kernel_parity(gm, path, [x], atol=1e-4)
    assert parity is not None and not parity.holds
    assert parity.worst is not None and parity.worst.name == "oq"
    assert parity.worst.off_boundary_fraction > 1e-3
