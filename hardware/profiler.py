"""Per-node latency of a whole ONNX model from ONNX Runtime's profiler, mapped back to IR nodes.

ONNX Runtime writes one JSON event per kernel run (``cat: "Node"``, ``name:
"<node>_kernel_time"``, ``dur`` in µs). At ``ORT_ENABLE_EXTENDED`` kernel names are node
names of the *optimized* graph, where fused kernels (``FusedConv``, ``QLinearConv``, ...)
keep the name of one original node. To attribute a fused kernel to everything it came from,
the optimized graph is saved too, and for each of its nodes the original nodes between its
inputs and its outputs are collected (a backward walk in the exported graph).

Original ONNX nodes lead to IR nodes through the exporter's ``metadata_props``:
``pkg.torch.onnx.name_scopes`` lists the module path of the node (``['layer1', 'layer1.0',
'layer1.0.conv1', 'conv2d']``); the deepest path that is a ``call_module`` target of the IR
names the IR node. A Conv into which the exporter folded a BatchNorm names the BatchNorm
module, so it maps to the BatchNorm and to the convolution feeding it. Ops that the model
calls as functions (residual ``add``, ``flatten``) have no module of their own; they are
matched by dataflow: the IR function node whose inputs are exactly the IR nodes that produced
the ONNX node's inputs.
"""

from __future__ import annotations

import ast
import json
import statistics
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from torch import fx, nn

from fxsculpt.hardware.runtime import measurement_session, session_inputs
from fxsculpt.ir.graph import IR

SCOPES_KEY = "pkg.torch.onnx.name_scopes"


@dataclass
class KernelTime:
    """One kernel of the optimized graph: its median time per run and the IR nodes it covers."""

    onnx_node: str
    op_type: str
    ms: float
    ir_nodes: list[str] = field(default_factory=list)
    primary: str | None = None  # the IR node that gets the time (most MACs among ir_nodes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelProfile:
    """Per-kernel medians plus the median of whole runs as the profiler saw them."""

    kernels: list[KernelTime]
    run_ms: float
    runs: int

    @property
    def kernel_ms(self) -> float:
        return sum(k.ms for k in self.kernels)

    def by_ir_node(self) -> dict[str, float]:
        """Milliseconds per IR node: each kernel's time goes to its primary node."""
        out: dict[str, float] = defaultdict(float)
        for kernel in self.kernels:
            if kernel.primary is not None:
                out[kernel.primary] += kernel.ms
        return dict(out)

    def unmapped(self) -> list[KernelTime]:
        return [k for k in self.kernels if k.primary is None]


# -- mapping ONNX nodes to IR nodes -------------------------------------------------------------
def _scopes(node: onnx.NodeProto) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            try:
                value = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return [str(v) for v in value] if isinstance(value, list | tuple) else []
    return []


def _module_node_by_target(ir: IR) -> dict[str, fx.Node]:
    return {str(n.target): n for n in ir.gm.graph.nodes if n.op == "call_module"}


def _producer_through_free(ir: IR, node: fx.Node) -> fx.Node | None:
    """The node feeding ``node`` (its first input)."""
    inputs = node.all_input_nodes
    return inputs[0] if inputs else None


def map_onnx_nodes(model: onnx.ModelProto, ir: IR) -> dict[str, list[str]]:
    """Original ONNX node name → the IR node names it implements (empty when unknown)."""
    by_target = _module_node_by_target(ir)
    ir_nodes = {n.name: n for n in ir.gm.graph.nodes}
    placeholders = [n for n in ir.gm.graph.nodes if n.op == "placeholder"]
    graph_inputs = [i.name for i in model.graph.input]
    initializers = {i.name for i in model.graph.initializer}

    # tensor name -> IR node whose output it (last) carries
    tensor_ir: dict[str, fx.Node] = {}
    for name, node in zip(graph_inputs, placeholders):
        tensor_ir[name] = node
    mapping: dict[str, list[str]] = {}
    claimed: set[fx.Node] = set()
    for onnx_node in model.graph.node:
        scopes = _scopes(onnx_node)
        found: list[fx.Node] = []
        for path in reversed(scopes[:-1] if len(scopes) > 1 else scopes):
            ir_node = by_target.get(path)
            if ir_node is not None:
                found = [ir_node]
                module = ir.gm.get_submodule(path)
                if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d) and onnx_node.op_type in (
                    "Conv",
                    "Gemm",
                ):
                    source = _producer_through_free(ir, ir_node)
                    if source is not None and source.op == "call_module":
                        found = [source, ir_node]
                break
        if not found:
            producers: set[fx.Node] = set()
            for tensor in onnx_node.input:
                if tensor in tensor_ir:
                    producers.add(tensor_ir[tensor])
            found = _match_by_dataflow(ir, producers, claimed)
        if found:
            claimed.update(found)
            for out in onnx_node.output:
                tensor_ir[out] = found[-1]
        else:
            # constants and shape arithmetic: carry the producers through so consumers still match
            sources = [tensor_ir[t] for t in onnx_node.input if t in tensor_ir and t not in initializers]
            if len(sources) == 1:
                for out in onnx_node.output:
                    tensor_ir[out] = sources[0]
        mapping[onnx_node.name] = [n.name for n in found]
    del ir_nodes
    return mapping


def _erased_source(ir: IR, node: fx.Node) -> fx.Node:
    """Follow Identity/Dropout modules (which export to nothing) back to the node they pass on."""
    while node.op == "call_module" and isinstance(
        ir.gm.get_submodule(str(node.target)), nn.Identity | nn.Dropout | nn.Dropout2d
    ):
        if not node.all_input_nodes:
            break
        node = node.all_input_nodes[0]
    return node


def _match_by_dataflow(ir: IR, producers: set[fx.Node], claimed: set[fx.Node]) -> list[fx.Node]:
    if not producers:
        return []
    exact = [
        n
        for n in ir.gm.graph.nodes
        if n.op in ("call_function", "call_method")
        and n not in claimed
        and {_erased_source(ir, a) for a in n.all_input_nodes} == producers
    ]
    if exact:
        return [exact[0]]
    # an op the exporter split into several ONNX nodes: later pieces read the earlier piece
    for node in producers:
        if node.op in ("call_function", "call_method") and producers <= {node, *node.all_input_nodes}:
            return [node]
    return []


def _original_name(name: str, original_names: set[str]) -> str:
    """The exported node a kernel of the optimized graph is named after (ORT appends suffixes such
    as ``/duplicated`` to nodes it copies)."""
    while name not in original_names and "/" in name:
        name = name.rsplit("/", 1)[0]
    return name


def _fused_sources(original: onnx.ModelProto, optimized: onnx.ModelProto) -> dict[str, list[str]]:
    """Optimized node name → the original node names between its inputs and outputs."""
    producer = {out: n for n in original.graph.node for out in n.output}
    original_names = {n.name for n in original.graph.node}
    optimized_names = {n.name for n in optimized.graph.node}
    result: dict[str, list[str]] = {}
    for node in optimized.graph.node:
        stop = set(node.input)
        seen: list[str] = []
        stack = [t for t in node.output if t in producer]
        visited: set[str] = set()
        while stack:
            tensor = stack.pop()
            if tensor in stop or tensor in visited:
                continue
            visited.add(tensor)
            src = producer.get(tensor)
            if src is None:
                continue
            if src.name in optimized_names and src.name != node.name:
                continue  # still a kernel of its own
            if src.name not in seen:
                seen.append(src.name)
            stack.extend(src.input)
        own = _original_name(node.name, original_names)
        if own not in seen and own in original_names:
            seen.append(own)
        result[node.name] = seen
    return result


# -- profiling ------------------------------------------------------------------------------------
def _node_events(profile_path: str) -> tuple[dict[str, list[float]], dict[str, str], list[float]]:
    with open(profile_path, encoding="utf-8") as handle:
        events = json.load(handle)
    durations: dict[str, list[float]] = defaultdict(list)
    op_types: dict[str, str] = {}
    runs: list[float] = []
    for event in events:
        name = str(event.get("name", ""))
        if event.get("cat") == "Node" and name.endswith("_kernel_time"):
            node = name[: -len("_kernel_time")]
            durations[node].append(float(event.get("dur", 0)) / 1000.0)
            op_types[node] = str(event.get("args", {}).get("op_name", ""))
        elif event.get("cat") == "Session" and name == "model_run":
            runs.append(float(event.get("dur", 0)) / 1000.0)
    return durations, op_types, runs


def profile_onnx(
    path: str | Path,
    ir: IR | None = None,
    threads: int = 1,
    runs: int = 20,
    warmup: int = 5,
    batch: int = 1,
) -> ModelProfile:
    """Run ``path`` ``warmup + runs`` times with the profiler on; per-kernel medians of the timed runs.

    With ``ir`` each kernel lists the IR nodes it came from and its primary node (the one
    with the most MACs, else the first).
    """
    path = Path(path)
    original = onnx.load(str(path), load_external_data=False)
    with tempfile.TemporaryDirectory(prefix="fxsculpt-profile-") as tmp:
        optimized_path = Path(tmp) / "optimized.onnx"
        session = measurement_session(
            path,
            threads,
            profile_prefix=str(Path(tmp) / "ort"),
            optimized_model_path=optimized_path,
            optimization="extended",  # node names still map back to the file
        )
        fallback = tuple(ir.input_shape) if ir is not None else None
        feeds = session_inputs(session, batch=batch, fallback_shape=fallback)
        for _ in range(warmup + runs):
            session.run(None, feeds)
        profile_file = session.end_profiling()
        durations, op_types, run_times = _node_events(profile_file)
        optimized = onnx.load(str(optimized_path), load_external_data=False)
    sources = _fused_sources(original, optimized)
    original_names = {n.name for n in original.graph.node}
    onnx_to_ir = map_onnx_nodes(original, ir) if ir is not None else {}
    macs = {n.name: ir.meta(n).macs for n in ir.gm.graph.nodes} if ir is not None else {}
    ir_order = {n.name: i for i, n in enumerate(ir.gm.graph.nodes)} if ir is not None else {}
    kernels: list[KernelTime] = []
    for node in optimized.graph.node:
        times = durations.get(node.name)
        if not times:
            continue
        timed = times[warmup:] if len(times) > warmup else times
        covered: list[str] = []
        for original_name in sources.get(node.name, []):
            for ir_name in onnx_to_ir.get(original_name, []):
                if ir_name not in covered:
                    covered.append(ir_name)
        covered.sort(key=lambda n: ir_order.get(n, 0))
        own = set(onnx_to_ir.get(_original_name(node.name, original_names), []))
        primary = (
            max(covered, key=lambda n: (macs.get(n, 0), n in own, -ir_order.get(n, 0))) if covered else None
        )
        kernels.append(
            KernelTime(
                onnx_node=node.name,
                op_type=op_types.get(node.name, node.op_type),
                ms=float(statistics.median(timed)),
                ir_nodes=covered,
                primary=primary,
            )
        )
    timed_runs = run_times[warmup:] if len(run_times) > warmup else run_times
    run_ms = float(np.median(timed_runs)) if timed_runs else sum(k.ms for k in kernels)
    return ModelProfile(kernels=kernels, run_ms=run_ms, runs=len(timed_runs))


def attach_latencies(ir: IR, profile: ModelProfile) -> None:
    """Write each IR node's measured milliseconds into ``NodeMeta.latency_ms`` (0 for fused nodes)."""
    times = profile.by_ir_node()
    covered = {name for k in profile.kernels for name in k.ir_nodes}
    for node in ir.gm.graph.nodes:
        if node.name in times:
            ir.meta(node).latency_ms = times[node.name]
        elif node.name in covered:
            ir.meta(node).latency_ms = 0.0
