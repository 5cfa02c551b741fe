"""Property tests on random CNNs: tracing, shape propagation, semantics-preserving passes,
pruning gates at one, export.

Each property is checked against an independent reference: the original ``nn.Module``'s own
outputs and shapes, and ONNX Runtime running the exported file.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxsculpt.ir.constructs import Gate
from fxsculpt.ir.graph import IR
from fxsculpt.nas.dso.gating import gate_branches, gate_channels
from fxsculpt.nas.dso.shrink import shrink
from fxsculpt.passes import Context, Pipeline
from tests.random_cnn import build, cnn_specs

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EXPORT = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**16)


def ctx_for(tmp_path_factory) -> Context:
    out = tmp_path_factory.mktemp("prop")
    (out / "stage").mkdir()
    return Context(out_dir=out, stage_dir=out / "stage")


@FAST
@given(specs=cnn_specs, seed=seeds, size=st.sampled_from((8, 12, 16)))
def test_tracing_and_shapes_match_the_module(specs, seed, size):
    model = build(specs, seed)
    ir = IR.from_module(model, (1, 3, size, size), num_classes=5)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert torch.equal(ir.gm(x), model(x))
    recorded: dict[str, tuple[int, ...]] = {}
    hooks = [
        module.register_forward_hook(lambda m, i, o, name=name: recorded.__setitem__(name, tuple(o.shape)))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    for node in ir.gm.graph.nodes:
        if node.op == "call_module" and node.target in recorded:
            assert ir.meta(node).shape == recorded[node.target]


@FAST
@given(specs=cnn_specs, seed=seeds)
def test_fold_bn_and_dce_keep_outputs(specs, seed, tmp_path_factory):
    model = build(specs, seed)
    ir = IR.from_module(model, (1, 3, 16, 16), num_classes=5)
    result = Pipeline(["fold_bn", "dce"], export=False).run(ir, ctx_for(tmp_path_factory))
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        expected, got = model(x), result.ir.gm(x)
    assert torch.allclose(got, expected, atol=1e-4 * max(1.0, float(expected.abs().max())))
    remaining_bn = [m for m in result.ir.gm.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not remaining_bn  # every BN in these nets directly follows a conv used only by it


@FAST
@given(specs=cnn_specs, seed=seeds)
def test_pruning_with_all_one_gates_keeps_outputs(specs, seed):
    model = build(specs, seed)
    ir = IR.from_module(model, (1, 3, 16, 16), num_classes=5)
    ir.gm.eval()
    names = gate_branches(ir) + gate_channels(ir)
    gates = [ir.gm.get_submodule(n) for n in names]
    assert all(isinstance(g, Gate) and bool((g.lam == 1).all()) for g in gates)  # λ starts at 1
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(seed + 3))
    with torch.no_grad():
        expected = model.eval()(x)
        gated = ir.gm(x)
        assert torch.allclose(gated, expected, atol=1e-5 * max(1.0, float(expected.abs().max())))
        params = sum(p.numel() for p in model.parameters())
        report = shrink(ir)  # nothing reached zero: nothing may be removed, outputs unchanged
        assert torch.allclose(ir.gm(x), expected, atol=1e-5 * max(1.0, float(expected.abs().max())))
    kept = sum(p.numel() for n, p in ir.gm.named_parameters() if not n.startswith("dso_gates"))
    assert kept == params, report


@EXPORT
@given(specs=cnn_specs, seed=seeds)
def test_export_matches_onnx_runtime(specs, seed, tmp_path_factory):
    model = build(specs, seed)
    ir = IR.from_module(model, (1, 3, 16, 16), num_classes=5)
    ctx = ctx_for(tmp_path_factory)
    Pipeline([], export=True).run(ir, ctx)
    session = ort.InferenceSession(str(ctx.artifacts["model.onnx"]), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(seed + 2))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, float(np.abs(expected).max()))
