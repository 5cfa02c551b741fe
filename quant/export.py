"""Export a quantized IR to ONNX and check it in ONNX Runtime: settings, op counts, parity.

:func:`export_settings` is what an exporter asks of a graph with quantizers: the opset (21 when
a layer has INT4 weights, else 18) and extra ``torch.onnx.export`` keyword arguments (the INT4
``custom_translation_table``). :func:`export_quantized` is a self-contained exporter used by the
tests and the benchmark; the pipeline's ``export`` pass asks :func:`export_settings` instead.
"""

from __future__ import annotations

import collections
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx

from fxsculpt.quant.modules import ActQuantizer, WeightQuantizer
from fxsculpt.quant.onnx_int4 import register_fake_kernels, translation_table
from fxsculpt.quant.onnx_weights import store_integer_weights

#: Ops that show a layer runs on integer kernels in ONNX Runtime's optimized graph.
INTEGER_KERNELS = ("QLinearConv", "QGemm", "MatMulInteger", "QLinearMatMul", "ConvInteger")


def has_quantizers(gm: torch.nn.Module) -> bool:
    return any(isinstance(m, ActQuantizer | WeightQuantizer) for m in gm.modules())


def export_settings(gm: torch.nn.Module, opset: int = 18) -> tuple[int, dict[str, Any]]:
    """``(opset, extra_kwargs)`` for exporting ``gm``; also registers the fake kernels dynamic batch needs.

    Unfrozen weight quantizers are frozen first would change the model, so they are refused.
    """
    if not has_quantizers(gm):
        return opset, {}
    register_fake_kernels()
    extra: dict[str, Any] = {}
    if any(isinstance(m, WeightQuantizer) and m.uses_int4() for m in gm.modules()):
        opset = max(opset, 21)
        extra["custom_translation_table"] = translation_table()
    return opset, extra


def export_quantized(
    gm: fx.GraphModule | torch.nn.Module, example: torch.Tensor, path: str | Path, dynamic_batch: bool = True
) -> Path:
    """Export ``gm`` (eval mode, frozen weights) to one ONNX file at ``path``."""
    path = Path(path)
    opset, extra = export_settings(gm)
    was_training = gm.training
    gm.eval()
    kwargs: dict[str, Any] = {"dynamo": True, "external_data": False, "opset_version": opset, **extra}
    if dynamic_batch:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
    try:
        with torch.no_grad():
            torch.onnx.export(gm, (example,), str(path), verbose=False, **kwargs)
    finally:
        gm.train(was_training)
    store_integer_weights(path)
    return path


def session(path: str | Path, threads: int = 1, optimized_path: str | Path | None = None) -> Any:
    """An ONNX Runtime CPU session with all graph optimizations and a fixed thread count."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def optimized_model(path: str | Path) -> Any:
    """The ``onnx.ModelProto`` ONNX Runtime actually runs (after its fusions, as :func:`session` optimizes)."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        session(path, 1, out)
        return onnx.load(str(out))


def optimized_op_counts(path: str | Path) -> collections.Counter[str]:
    """Op types of the graph ONNX Runtime actually runs (after its fusions), counted."""
    return collections.Counter(node.op_type for node in optimized_model(path).graph.node)


#: Float kernels of a weighted layer in ONNX Runtime's optimized graph (weight: input 1).
FLOAT_KERNELS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")


def float_weight_kernels(path: str | Path) -> list[str]:
    """Nodes of the optimized graph that compute with float weights stored as float32 constants.

    These are the layers that really run in float. A float kernel whose weight comes from a
    DequantizeLinear (an INT4 layer, or a float weight ONNX Runtime quantized itself) is not one.
    """
    import onnx

    graph = optimized_model(path).graph
    float_constants = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    return [
        node.name or node.output[0]
        for node in graph.node
        if node.op_type in FLOAT_KERNELS and len(node.input) > 1 and node.input[1] in float_constants
    ]


def run_session(sess: Any, x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Run the session's first output on one input batch."""
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: array.astype(np.float32)})[0])


def parity(gm: torch.nn.Module, path: str | Path, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """Top-1 agreement and max |logit difference| between PyTorch ``gm`` and the ONNX file.

    Returns ``{"agreement", "max_abs_diff", "samples"}``.
    """
    sess = session(path)
    agree, seen, worst = 0, 0, 0.0
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            for x in batches:
                expected = gm(x).detach().cpu().numpy()
                got = run_session(sess, x)
                agree += int((expected.argmax(1) == got.argmax(1)).sum())
                seen += len(x)
                worst = max(worst, float(np.abs(expected - got).max()))
    finally:
        gm.train(was_training)
    return {"agreement": agree / max(seen, 1), "max_abs_diff": worst, "samples": float(seen)}
