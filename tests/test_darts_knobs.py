"""The knobs that bound a relaxation (darts.pattern, kinds, ops, data_fraction, epochs), checked
against counts derived by hand from examples/mobilenetv2_user.py's block table, and the merged
kernel-size mixture against the plain sum of its convolutions."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from examples.mobilenetv2_user import BLOCKS, UserMobileNetV2
from fxsculpt.ir.constructs import Choice
from fxsculpt.ir.graph import IR
from fxsculpt.nas.darts.mixed import MixedOp, conv_merge_group
from fxsculpt.nas.darts.ops import Pool
from fxsculpt.nas.darts.relax import RELAX_OPS, build_conv_like, candidates_for, relax
from fxsculpt.nas.darts.search import SearchSettings, search
from fxsculpt.passes.base import Context, TrainSettings
from fxsculpt.passes.darts import DartsOptions, torch_threads
from fxsculpt.passes.options import build_options
from fxsculpt.passes.pipeline import Pipeline


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def _user_ir() -> IR:
    torch.manual_seed(0)
    return IR.from_module(UserMobileNetV2().eval(), (1, 3, 32, 32), 10)


def _blocks() -> list[tuple[int, int, int, int, bool]]:
    """(index, hidden channels, stride, expansion, residual) of each block, from the block table."""
    out = []
    channels = 32
    for index, (expansion, c_out, stride) in enumerate(BLOCKS):
        out.append((index, channels * expansion, stride, expansion, stride == 1 and channels == c_out))
        channels = c_out
    return out


def test_default_relaxation_of_the_user_mobilenet_is_the_hand_derived_one() -> None:
    ir = _user_ir()
    options = DartsOptions()
    relaxed = relax(ir, options.pattern, options.ops, kinds=options.kinds)
    # 31 convs: stem (dense 3x3), 10 depthwise, 20 1x1; 1x1 convs are not relaxed by default
    expected: dict[str, list[str]] = {"stem": ["conv_3x3", "conv_5x5"]}  # 3 -> 32: no skip, only path
    for index, _, stride, _, residual in _blocks():
        names = ["conv_3x3", "conv_5x5"]
        if stride == 1:
            names.append("skip_connect")  # depthwise keeps channels: the identity fits at stride 1
        if residual:
            names.append("none")  # the shortcut keeps the graph connected
        expected[f"blocks_{index}_depthwise"] = names
    assert relaxed == expected
    for index, hidden, stride, _, _ in _blocks():
        mixed = ir.gm.get_submodule(f"blocks.{index}.depthwise")
        assert isinstance(mixed, MixedOp)
        convs = [c for c in mixed.candidates if isinstance(c, nn.Conv2d)]
        # depthwise stays depthwise, at the node's stride, with the output size kept
        assert [c.kernel_size for c in convs] == [(3, 3), (5, 5)]
        assert all(c.groups == c.in_channels == c.out_channels == hidden for c in convs)
        assert all(c.stride == (stride, stride) for c in convs)
        assert [c.padding for c in convs] == [(1, 1), (2, 2)]
        assert not any(isinstance(m, nn.Conv2d) and m.groups == 1 for m in mixed.modules())


def test_pattern_on_node_names_and_kinds_limit_the_relaxed_nodes() -> None:
    # node names of nested modules (blocks_3_depthwise), as `cli.py inspect` prints them
    ir = _user_ir()
    relaxed = relax(ir, r"blocks_[0-4]_depthwise", kinds=("depthwise",))
    assert sorted(relaxed) == [f"blocks_{i}_depthwise" for i in range(5)]

    # kinds=pointwise with 1x1/3x3 candidates: exactly the 1x1 convs that can choose
    ir = _user_ir()
    opts = build_options(DartsOptions, {"kinds": "pointwise", "ops": "conv_1x1,conv_3x3"}, "darts")
    relaxed = relax(ir, opts.pattern, opts.ops, kinds=opts.kinds)
    pointwise = ["head"]
    for index, _, _, expansion, _ in _blocks():
        if expansion != 1:
            pointwise.append(f"blocks_{index}_expand")
        pointwise.append(f"blocks_{index}_project")
    assert len(pointwise) == 20
    assert sorted(relaxed) == sorted(pointwise)
    assert all(names == ["conv_1x1", "conv_3x3"] for names in relaxed.values())


def test_ops_option_builds_exactly_those_candidates() -> None:
    ir = _user_ir()
    opts = build_options(DartsOptions, {"ops": "conv_3x3,conv_7x7,avg_pool_3x3"}, "darts")
    relaxed = relax(ir, opts.pattern, opts.ops, kinds=opts.kinds)
    # the stem widens 3 -> 32 channels: no pooling; every depthwise node keeps its channels
    assert relaxed["stem"] == ["conv_3x3", "conv_7x7"]
    assert len(relaxed) == 1 + len(BLOCKS)
    for index, hidden, stride, _, _ in _blocks():
        assert relaxed[f"blocks_{index}_depthwise"] == ["conv_3x3", "conv_7x7", "avg_pool_3x3"]
        mixed = ir.gm.get_submodule(f"blocks.{index}.depthwise")
        assert isinstance(mixed, MixedOp)
        c3, c7, pool = mixed.candidates
        assert isinstance(c3, nn.Conv2d) and c3.kernel_size == (3, 3) and c3.groups == hidden
        assert isinstance(c7, nn.Conv2d) and c7.kernel_size == (7, 7) and c7.padding == (3, 3)
        assert isinstance(pool, Pool) and isinstance(pool.pool, nn.AvgPool2d)
        assert pool.pool.stride == stride


def test_conv_like_keeps_the_nodes_output_size() -> None:
    valid = nn.Conv2d(4, 6, 3, stride=2, padding=0, bias=True)  # 9x9 -> 4x4
    wide = build_conv_like(valid, 5, 4, 6, 2)
    assert isinstance(wide, nn.Conv2d) and wide.padding == (1, 1) and wide.bias is not None
    assert build_conv_like(valid, 1, 4, 6, 2) is None  # padding would be -1
    dilated = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4, bias=False)
    like = build_conv_like(dilated, 5, 4, 4, 1)
    assert isinstance(like, nn.Conv2d) and like.padding == (4, 4) and like.groups == 4
    x = torch.randn(1, 4, 9, 9)
    assert wide(x).shape == valid(x).shape
    assert like(x).shape == dilated(x).shape


def test_a_patch_embedding_offers_odd_kernels_at_its_stride() -> None:
    # A ViT's 4x4 stride-4 patch conv on 32 px: 8x8 patches. Hand count with out = (32 + 2p - K) // 4 + 1:
    # K=3 needs p=0 (29 // 4 + 1 = 8), K=5 needs p=1 (29 // 4 + 1 = 8; p=0 gives 7).
    patch = nn.Conv2d(3, 16, 4, stride=4)
    ops, names = candidates_for(patch, (1, 3, 32, 32), (1, 16, 8, 8), RELAX_OPS, allow_none=False)
    by_name = dict(zip(names, ops))
    assert {"conv_3x3", "conv_5x5"} <= set(names)
    assert by_name["conv_3x3"].padding == (0, 0) and by_name["conv_5x5"].padding == (1, 1)
    x = torch.randn(2, 3, 32, 32)
    assert by_name["conv_5x5"](x).shape == patch(x).shape
    # at stride 1 an odd growth changes the size: the shape check drops the op
    same = nn.Conv2d(3, 16, 4, padding="same")
    _, names = candidates_for(same, (1, 3, 9, 9), (1, 16, 9, 9), RELAX_OPS, allow_none=False)
    assert "conv_3x3" not in names and "conv_5x5" not in names


@pytest.mark.parametrize(
    "groups,stride,bias,dilation", [(6, 1, False, 1), (1, 2, True, 1), (3, 1, True, 2), (6, 2, False, 1)]
)
def test_merged_kernel_sizes_equal_the_sum_of_their_convolutions(
    groups: int, stride: int, bias: bool, dilation: int
) -> None:
    torch.manual_seed(0)
    convs = [
        nn.Conv2d(6, 6, k, stride, dilation * (k - 1) // 2, dilation, groups, bias).double()
        for k in (1, 3, 5)
    ]
    mixed = MixedOp(
        [*convs, nn.Identity()] if stride == 1 else convs, ["a", "b", "c", "d"][: 4 - (stride != 1)]
    )
    mixed.double()
    assert mixed.merged == [0, 1, 2]
    with torch.no_grad():
        mixed.alpha.copy_(torch.tensor([0.3, -0.2, 0.5, 0.1][: len(mixed.alpha)], dtype=torch.float64))
    x = torch.randn(2, 6, 11, 11, dtype=torch.float64, requires_grad=True)
    params = [x, mixed.alpha, *(p for c in convs for p in c.parameters())]
    out = mixed(x)
    # the reference: DARTS eq. 2 written out with F.conv2d, one convolution per candidate
    w = torch.softmax(mixed.alpha, 0)
    ref = sum(
        w[i] * F.conv2d(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
        for i, c in enumerate(convs)
    )
    if stride == 1:
        ref = ref + w[3] * x
    assert torch.allclose(out, ref, atol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, params, g)
    want = torch.autograd.grad(ref, params, g)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-10)


def test_convolutions_that_differ_in_more_than_kernel_size_are_not_merged() -> None:
    same = nn.Conv2d(4, 4, 3, padding=1)
    assert conv_merge_group([same, nn.Conv2d(4, 4, 5, padding=0)]) == []  # other centre offset
    assert conv_merge_group([same, nn.Conv2d(4, 4, 5, padding=2, groups=4)]) == []  # other groups
    assert conv_merge_group([same, nn.Conv2d(4, 4, 5, padding=2, bias=False)]) == []  # bias
    assert conv_merge_group([same, nn.Conv2d(4, 4, 5, padding=2)]) == [0, 1]


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1), 1))


@pytest.mark.parametrize("fraction,cap,expected", [(1.0, 0, 10), (0.25, 0, 3), (0.05, 0, 1), (0.5, 2, 2)])
def test_data_fraction_limits_the_steps_per_epoch(fraction: float, cap: int, expected: int) -> None:
    torch.manual_seed(0)
    ir = IR.from_module(_Tiny(), (1, 3, 6, 6), 3)
    relax(ir)
    alphas = ir.arch_parameters()
    arch = {id(a) for a in alphas}
    weights = [p for p in ir.gm.parameters() if id(p) not in arch]
    g = torch.Generator().manual_seed(1)
    # 40 images per split at batch 4: 10 pairs of batches a full epoch
    train, val = (
        TensorDataset(torch.randn(40, 3, 6, 6, generator=g), torch.randint(0, 3, (40,), generator=g))
        for _ in range(2)
    )
    calls = []
    ir.gm.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    settings = SearchSettings(epochs=2, batch_size=4, steps_per_epoch=cap, data_fraction=fraction)
    result = search(
        ir.gm, weights, alphas, train, val, settings, torch.device("cpu"), torch.Generator().manual_seed(0)
    )
    # first order: an α forward and a weight forward per step (ceil(0.25 * 10) = 3, ceil(0.5) = 1)
    assert len(calls) == 2 * 2 * expected
    assert [h["steps"] for h in result.history] == [expected, expected]
    assert expected == (min(math.ceil(fraction * 10), cap) if cap else math.ceil(fraction * 10))


def test_user_mobilenet_pass_run_relaxes_searches_discretizes_and_exports(
    cifar_npz: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's CLI run in small: the darts pass with its defaults (two steps), epochs from
    --epochs, progress logged with an ETA, and the discretized model run in ONNX Runtime."""
    from fxsculpt.passes.export import ort_session, run_onnx
    from fxsculpt.training.data import load_data

    data = load_data(f"npz:{cifar_npz}", seed=0, val_fraction=0.1, limit=300)
    ir = _user_ir()
    out = tmp_path / "out"
    ctx = Context(
        out_dir=out,
        stage_dir=out / ".stage",
        data=data,
        train=TrainSettings(epochs=2, progress=True),
        threads=1,
        seed=0,
    )
    # 270 training images, halves of 135: 2 batches of 64; a fraction of 0.5 leaves 1 step per epoch
    options = {"darts": {"data_fraction": "0.5", "plots": "false"}}
    with caplog.at_level(logging.INFO, logger="fxsculpt"):
        result = Pipeline(["darts"], options=options).run(ir, ctx)
    section = ctx.sections["darts"]
    assert len(section["relaxed_nodes"]) == 1 + len(BLOCKS)
    assert [h["steps"] for h in section["history"]] == [1.0, 1.0]  # two epochs: --epochs
    assert len(section["epoch_seconds"]) == 2
    assert any("ETA" in r.getMessage() for r in caplog.records)
    assert not result.ir.construct_nodes(Choice)
    kept = section["decisions"]
    assert set(kept) == set(section["relaxed_nodes"])
    assert all(kept[n] in section["relaxed_nodes"][n] and kept[n] != "none" for n in kept)
    # the exported file, run here in ONNX Runtime, against the discretized graph
    model = result.ir.gm.eval()
    x = data.test.tensors[0][:8]
    with torch.no_grad():
        expected = model(x).numpy()
    got = run_onnx(ort_session(out / ".stage" / "model.onnx", threads=1), x.numpy())
    assert np.max(np.abs(got - expected)) < 1e-4 * max(1.0, float(np.abs(expected).max()))
