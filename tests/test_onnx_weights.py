"""Integer weights in the file: folding QuantizeLinear of constants computes what ORT computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from fxsculpt.quant.onnx_weights import fold_weight_quantizers, quantize_linear


def _conv_model(weight: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> onnx.ModelProto:
    inits = [
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(scale, "s"),
        numpy_helper.from_array(zero_point, "zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["w", "s", "zp"], ["wq"], axis=0),
        helper.make_node("DequantizeLinear", ["wq", "s", "zp"], ["wd"], axis=0),
        helper.make_node("Conv", ["x", "wd"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_quantize_linear_matches_onnx_runtime_including_ties() -> None:
    rng = np.random.default_rng(0)
    scale = np.array([0.1, 0.02, 0.5, 0.05], np.float32)
    weight = rng.normal(size=(4, 3, 3, 3)).astype(np.float32) * 3
    weight[0, 0, 0, :] = [0.05, 0.15, -0.25]  # exact halves of the scale: round half to even
    zero_point = np.zeros(4, np.int8)
    node = helper.make_node("QuantizeLinear", ["w", "s", "zp"], ["q"], axis=0)
    graph = helper.make_graph(
        [node],
        "q",
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, list(weight.shape))],
        [helper.make_tensor_value_info("q", TensorProto.INT8, list(weight.shape))],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero_point, "zp")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    reference = ort.InferenceSession(model.SerializeToString()).run(None, {"w": weight})[0]
    np.testing.assert_array_equal(quantize_linear(weight, scale, zero_point, 0), reference)


def test_folded_file_is_smaller_and_computes_the_same(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    scale = (np.abs(weight).reshape(4, -1).max(1) / 127).astype(np.float32)
    model = _conv_model(weight, scale, np.zeros(4, np.int8))
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    before = _run(model, x)
    size_before = len(model.SerializeToString())
    assert fold_weight_quantizers(model) == 1
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "Conv"]
    assert {t.name: t.data_type for t in model.graph.initializer}["wq"] == TensorProto.INT8
    np.testing.assert_array_equal(_run(model, x), before)
    assert len(model.SerializeToString()) < size_before  # 108 float weights became 108 bytes
