"""Single-layer ONNX models built from a :class:`~hardware.layers.LayerSignature`.

A latency table measures each layer alone, on the runtime, in the form it has inside an
exported model:

- float32: the ONNX op(s) the dynamo exporter writes (Conv, Gemm, Add, ReduceMean for a
  global average pool, Clip for ReLU6, ...), with the fused activation as its own node so
  that ONNX Runtime fuses it the way it does in the whole model.
- int8: a QDQ graph with uint8 activations and int8 per-channel weights (the fast path on
  this CPU, TOOLCHAIN.md): the input arrives as uint8, ``DequantizeLinear → op → [act] →
  QuantizeLinear`` and the output leaves as uint8, so ONNX Runtime fuses the group into one
  integer kernel (QLinearConv, QGemm, QLinearAdd, ...) with no extra conversions, as
  between two layers of a fully quantized model.

Other widths (2–7-bit weights or activations) are measured as float32 on ``ort-cpu``: ONNX
Runtime has no sub-8-bit kernels and dequantizes such weights to float (TOOLCHAIN.md), so the
float kernel is what runs; the ``bitserial`` target models what those widths would buy.

Models are built with ``onnx.helper`` (milliseconds, no tracing); an op without a builder
(``module:...`` signatures) is exported from the module itself with ``torch.onnx.export``.
"""

from __future__ import annotations

import copy
import io
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from fxsculpt.hardware.layers import LayerSignature
from fxsculpt.ir.errors import BadInputError, first_line

OPSET = 18
_X_SCALE, _X_ZP = 0.05, 128
_Y_SCALE, _Y_ZP = 0.05, 128


def is_int8(sig: LayerSignature) -> bool:
    """Whether ``sig`` runs on integer kernels: 8-bit activations (and 8-bit weights where it has any)."""
    if sig.op in ("conv", "linear"):
        return sig.weight_bits == 8 and sig.act_bits == 8
    return sig.act_bits == 8


class _Builder:
    """Collects nodes and initializers of one small graph."""

    def __init__(self, seed: int = 0) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def const(self, array: Any, stem: str) -> str:
        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], stem: str, **attrs: Any) -> str:
        out = self.name(stem)
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(f"n_{op}"), **attrs))
        return out

    def input(self, shape: tuple[int, ...], quantized: bool) -> str:
        name = f"x{len(self.inputs)}"
        elem = TensorProto.UINT8 if quantized else TensorProto.FLOAT
        self.inputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
        return name

    def dequant(self, name: str) -> str:
        return self.node(
            "DequantizeLinear",
            [name, self.const(np.float32(_X_SCALE), "s"), self.const(np.uint8(_X_ZP), "zp")],
            "dq",
        )

    def quant(self, name: str, act: str = "") -> str:
        """uint8 output; after ReLU the zero point is 0 (and ReLU6 spans 0..6) so that ONNX
        Runtime drops the activation into the integer kernel, as calibrated models allow."""
        scale, zp = (_Y_SCALE, _Y_ZP) if not act else (6.0 / 255.0 if act == "relu6" else _Y_SCALE, 0)
        return self.node(
            "QuantizeLinear",
            [name, self.const(np.float32(scale), "s"), self.const(np.uint8(zp), "zp")],
            "q",
        )

    def weight(self, shape: tuple[int, ...], quantized: bool) -> tuple[str, np.ndarray | None]:
        """A float weight, or an int8 weight dequantized per output channel (axis 0)."""
        fan_in = max(1, math.prod(shape[1:]))
        if not quantized:
            w = (self.rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32)
            return self.const(w, "w"), None
        wq = self.rng.integers(-127, 128, size=shape).astype(np.int8)
        scales = np.full((shape[0],), 0.01, dtype=np.float32)
        name = self.node(
            "DequantizeLinear",
            [self.const(wq, "wq"), self.const(scales, "ws"), self.const(np.zeros(shape[0], np.int8), "wzp")],
            "w",
            axis=0,
        )
        return name, scales

    def bias(self, n: int, weight_scales: np.ndarray | None) -> str:
        if weight_scales is None:
            return self.const((0.1 * self.rng.standard_normal(n)).astype(np.float32), "b")
        bq = self.rng.integers(-1000, 1000, size=n).astype(np.int32)
        scales = (weight_scales * _X_SCALE).astype(np.float32)
        return self.node(
            "DequantizeLinear",
            [self.const(bq, "bq"), self.const(scales, "bs"), self.const(np.zeros(n, np.int32), "bzp")],
            "b",
            axis=0,
        )

    def activation(self, name: str, act: str) -> str:
        if act == "relu":
            return self.node("Relu", [name], "relu")
        if act == "relu6":
            return self.node(
                "Clip", [name, self.const(np.float32(0.0), "lo"), self.const(np.float32(6.0), "hi")], "clip"
            )
        return name

    def model(self, output: str, out_shape: tuple[int, ...], quantized: bool) -> onnx.ModelProto:
        elem = TensorProto.UINT8 if quantized else TensorProto.FLOAT
        # rename the last value to "y" so the graph output has a fixed name
        for node in self.nodes:
            for i, out in enumerate(node.output):
                if out == output:
                    node.output[i] = "y"
        graph = helper.make_graph(
            self.nodes,
            "single_layer",
            self.inputs,
            [helper.make_tensor_value_info("y", elem, list(out_shape))],
            initializer=self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 9
        return model


#: Conversions a mixed float/int8 model runs as kernels of their own (:mod:`hardware.qdq`):
#: float → uint8 activations, uint8 → float activations, int8 weights → float (per channel).
CONVERSION_OPS = ("quantize", "dequantize", "dequantize_weight")


def conversion_signature(op: str, shape: tuple[int, ...]) -> LayerSignature:
    """The signature of one standalone conversion of a tensor of ``shape`` (``op`` in :data:`CONVERSION_OPS`)."""
    if op not in CONVERSION_OPS:
        raise BadInputError(f"unknown conversion '{op}' (known: {', '.join(CONVERSION_OPS)})")
    bits = 8
    return LayerSignature(
        op=op,
        in_shape=tuple(shape),
        out_shape=tuple(shape),
        weight_bits=bits if op == "dequantize_weight" else None,
        act_bits=None if op == "dequantize_weight" else bits,
    )


def _conversion(b: _Builder, sig: LayerSignature) -> onnx.ModelProto:
    """``QuantizeLinear`` (float in, uint8 out), ``DequantizeLinear`` (uint8 in, float out), or the
    per-channel ``DequantizeLinear`` of a constant int8 weight, which ONNX Runtime keeps as a kernel
    that runs every inference when no integer kernel absorbs it."""
    shape = sig.in_shape
    if sig.op == "quantize":
        x = b.input(shape, quantized=False)
        return b.model(b.quant(x), shape, quantized=True)
    if sig.op == "dequantize":
        x = b.input(shape, quantized=True)
        return b.model(b.dequant(x), shape, quantized=False)
    w, _ = b.weight(shape, quantized=True)
    return b.model(w, shape, quantized=False)


def build_single_layer(sig: LayerSignature, module: nn.Module | None = None, seed: int = 0) -> bytes:
    """A serialized ONNX model that runs the layer ``sig`` alone (float32 or int8 QDQ)."""
    b = _Builder(seed)
    op = sig.op
    if op in CONVERSION_OPS:
        return _conversion(b, sig).SerializeToString()
    quantized = is_int8(sig)
    if op.startswith("module:"):
        if module is None:
            raise BadInputError(f"cannot build a single-layer model for {op} without its module")
        return export_module(module, sig.in_shape)
    x = b.input(sig.in_shape, quantized)
    if op == "reshape":  # a reshape moves uint8 data as it is: no Q/DQ around it
        target = b.const(np.array(sig.out_shape, np.int64), "shape")
        h = b.node("Reshape", [x, target], "reshape")
        return b.model(h, sig.out_shape, quantized).SerializeToString()
    h = b.dequant(x) if quantized else x
    if op == "conv":
        cout, cin = sig.out_shape[1], sig.in_shape[1]
        w, w_scales = b.weight((cout, cin // sig.groups, *sig.kernel), quantized)
        inputs = [h, w] + ([b.bias(cout, w_scales)] if sig.bias else [])
        pads = list(sig.padding) + list(sig.padding)
        h = b.node(
            "Conv",
            inputs,
            "conv",
            kernel_shape=list(sig.kernel),
            strides=list(sig.stride),
            pads=pads,
            dilations=list(sig.dilation),
            group=sig.groups,
        )
    elif op == "linear":
        fin, fout = sig.in_shape[-1], sig.out_shape[-1]
        w, w_scales = b.weight((fout, fin), quantized)
        if len(sig.in_shape) == 2:
            inputs = [h, w] + ([b.bias(fout, w_scales)] if sig.bias else [])
            h = b.node("Gemm", inputs, "gemm", transB=1)
        else:
            wt = b.node("Transpose", [w], "wt", perm=[1, 0])
            h = b.node("MatMul", [h, wt], "mm")
            if sig.bias:
                h = b.node("Add", [h, b.bias(fout, w_scales)], "add")
    elif op in ("add", "mul"):
        other_shape = tuple(int(d) for d in sig.extra.split("x")) if sig.extra else sig.in_shape
        y = b.input(other_shape, quantized)
        h2 = b.dequant(y) if quantized else y
        h = b.node("Add" if op == "add" else "Mul", [h, h2], op)
    elif op in ("add_scalar", "mul_scalar"):
        h = b.node("Add" if op == "add_scalar" else "Mul", [h, b.const(np.float32(1.5), "c")], op)
    elif op in ("relu", "relu6"):
        h = b.activation(h, op)
    elif op == "bn":
        c = sig.in_shape[1]
        h = b.node(
            "BatchNormalization",
            [
                h,
                b.const(np.ones(c, np.float32), "g"),
                b.const(np.zeros(c, np.float32), "beta"),
                b.const(np.zeros(c, np.float32), "mu"),
                b.const(np.ones(c, np.float32), "var"),
            ],
            "bn",
        )
    elif op == "global_avgpool":
        h = b.node("ReduceMean", [h, b.const(np.array([-1, -2], np.int64), "axes")], "mean", keepdims=1)
    elif op in ("maxpool", "avgpool"):
        pads = list(sig.padding) + list(sig.padding)
        kind = "MaxPool" if op == "maxpool" else "AveragePool"
        h = b.node(kind, [h], "pool", kernel_shape=list(sig.kernel), strides=list(sig.stride), pads=pads)
    elif op == "concat":
        shapes = [tuple(s) for s in json.loads(sig.extra)]
        parts = [h]
        for shape in shapes[1:]:
            extra = b.input(shape, quantized)
            parts.append(b.dequant(extra) if quantized else extra)
        h = b.node("Concat", parts, "concat", axis=1)
    else:
        raise BadInputError(f"no single-layer builder for op '{op}'")
    act = sig.act if sig.op not in ("relu", "relu6") else sig.op
    h = b.activation(h, sig.act)
    if quantized:
        h = b.quant(h, act)
    return b.model(h, sig.out_shape, quantized).SerializeToString()


def export_module(module: nn.Module, in_shape: tuple[int, ...]) -> bytes:
    """Export ``module`` alone (eval mode) with the dynamo exporter, as one ONNX file in memory."""
    module = copy.deepcopy(module).eval().cpu()
    example = torch.randn(*in_shape)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "layer.onnx"
        _quiet_export(module, example, path)
        return path.read_bytes()


def _quiet_export(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    import contextlib
    import logging
    import warnings

    sink = io.StringIO()
    previous = logging.getLogger("torch").level
    logging.getLogger("torch").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(path), dynamo=True, external_data=False, verbose=False)
    except Exception as exc:
        first = first_line(exc)
        raise BadInputError(f"cannot export {type(module).__name__} to ONNX: {first}") from exc
    finally:
        logging.getLogger("torch").setLevel(previous)
