"""What the ONNX exporter needs for our quantizers: INT4 QDQ and fake kernels for dynamic batch.

- ``torch.onnx.export`` refuses a 4-bit range such as ``(-8, 7)`` in ``fake_quantize_*``. Four-bit
  weights therefore go through the custom op ``fxsculpt_quant::fake_quant_int4``, which PyTorch
  runs as an ordinary per-channel fake quantization and which :data:`TRANSLATION_TABLE` writes as
  an opset-21 ``QuantizeLinear(output_dtype=INT4)`` / ``DequantizeLinear`` pair (ONNX 1.16
  operators; ONNX Runtime runs them, dequantizing the weight to float: int4 buys size, not speed).
- ``aten.fake_quantize_per_{tensor,channel}_affine_cachemask`` have no fake (meta) kernel in
  torch 2.13, so exporting with a dynamic batch dimension fails; :func:`register_fake_kernels`
  adds them (TOOLCHAIN.md, "ONNX export").
"""

from __future__ import annotations

from typing import Any

import torch

_FAKE_REGISTERED = False


@torch.library.custom_op("fxsculpt_quant::fake_quant_int4", mutates_args=())
def fake_quant_int4(x: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    """Symmetric signed 4-bit fake quantization along ``axis`` (codes -8..7, zero point 0)."""
    zero_point = torch.zeros(scale.shape, dtype=torch.int32, device=x.device)
    return torch.fake_quantize_per_channel_affine(x, scale.float(), zero_point, axis, -8, 7)


@fake_quant_int4.register_fake
def _fake_quant_int4_fake(x: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.empty_like(x)


def _int4_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
    """Straight-through: the frozen weight sits on its grid, so nothing is clipped."""
    return grad, None, None


fake_quant_int4.register_autograd(_int4_backward)


def _int4_qdq_onnx(x: Any, scale: Any, axis: int) -> Any:
    """ONNX translation of :func:`fake_quant_int4`: INT4 QuantizeLinear then DequantizeLinear (opset 21)."""
    from onnx import TensorProto
    from onnxscript import opset21 as op

    q = op.QuantizeLinear(x, scale, axis=axis, output_dtype=TensorProto.INT4)
    return op.DequantizeLinear(q, scale, axis=axis)


def translation_table() -> dict[Any, Any]:
    """``custom_translation_table`` entries for ``torch.onnx.export(..., dynamo=True)``."""
    return {torch.ops.fxsculpt_quant.fake_quant_int4.default: _int4_qdq_onnx}


def register_fake_kernels() -> None:
    """Give the two cachemask fake-quant ops fake kernels (once per process)."""
    global _FAKE_REGISTERED
    if _FAKE_REGISTERED:
        return

    def per_tensor(x: torch.Tensor, scale: Any, zero_point: Any, qmin: int, qmax: int) -> Any:
        return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)

    def per_channel(
        x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, qmin: int, qmax: int
    ) -> Any:
        return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)

    for name, kernel in (
        ("aten::fake_quantize_per_tensor_affine_cachemask", per_tensor),
        ("aten::fake_quantize_per_channel_affine_cachemask", per_channel),
    ):
        try:
            torch.library.register_fake(name, kernel)
        except RuntimeError as exc:  # someone (another module) registered one already
            if "already" not in str(exc).lower():
                raise
    _FAKE_REGISTERED = True
