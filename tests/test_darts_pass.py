"""A CLI-shaped DARTS run on the real CIFAR-10 subset, then the derived network trains and exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fxsculpt.ir.constructs import Choice
from fxsculpt.ir.load import LoadOptions, load_ir
from fxsculpt.passes.base import Context, TrainSettings
from fxsculpt.passes.darts import torch_threads
from fxsculpt.passes.pipeline import Pipeline


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def test_darts_supernet_search_on_cifar_then_derived_network_trains_and_exports(
    cifar_npz: Path, tmp_path: Path
) -> None:
    from fxsculpt.nas.darts.augment import cutout
    from fxsculpt.nas.darts.genotype import load_genotype
    from fxsculpt.nas.darts.network import EvalNetwork
    from fxsculpt.passes.export import export_onnx, ort_session, run_onnx
    from fxsculpt.training.data import load_data
    from fxsculpt.zoo import BuiltinSpec, build_builtin

    torch.manual_seed(0)  # what cli.py does before building the model
    data = load_data(f"npz:{cifar_npz}", seed=0, val_fraction=0.1, limit=96)
    ir = load_ir(
        "builtin:darts-supernet",
        LoadOptions(
            input_shape=(1, 3, 32, 32),
            num_classes=10,
            model_options={"layers": "3", "channels": "4", "nodes": "2", "multiplier": "2"},
        ),
    )
    out = tmp_path / "out"
    ctx = Context(
        out_dir=out,
        stage_dir=out / ".stage",
        data=data,
        train=TrainSettings(progress=False),
        threads=1,
        seed=0,
    )
    options = {"darts": {"epochs": "2", "batch_size": "16", "steps_per_epoch": "2"}}
    result = Pipeline(["darts"], options=options).run(ir, ctx)
    assert [r.name for r in result.records] == ["darts", "export"]
    assert not result.ir.construct_nodes(Choice)

    staged = {p.name for p in (out / ".stage").iterdir()}
    assert {
        "genotype.json",
        "darts_alphas.png",
        "darts_normal.png",
        "darts_reduce.png",
        "model.onnx",
    } <= staged
    for png in ("darts_alphas.png", "darts_normal.png", "darts_reduce.png"):
        assert (out / ".stage" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document = json.loads((out / ".stage" / "genotype.json").read_text())
    section = ctx.sections["darts"]
    assert section["genotype"] == document
    assert set(document) == {"normal", "normal_concat", "reduce", "reduce_concat"}
    assert len(document["normal"]) == 4 and document["normal_concat"] == [2, 3]
    assert all(op != "none" for op, _ in document["normal"] + document["reduce"])
    assert len(section["history"]) == 2
    # ONNX parity as the export pass measured it
    assert ctx.sections["onnx"]["max_abs_diff"] <= ctx.sections["onnx"]["tolerance"]

    # The derived evaluation network from the written genotype: trains a step, then exports.
    genotype_file = out / ".stage" / "genotype.json"
    spec = BuiltinSpec(
        num_classes=10,
        options={"genotype": str(genotype_file), "layers": "3", "channels": "4", "drop_path": "0.2"},
    )
    net = build_builtin("darts-eval", spec)
    assert isinstance(net, EvalNetwork) and net.auxiliary_head is not None
    assert net.genotype == load_genotype(str(genotype_file))
    normal_ops = [type(op).__name__ for op in net.cells[0].ops]
    assert len(normal_ops) == len(document["normal"])
    x, y = data.train.tensors[0][:16], data.train.tensors[1][:16]
    x = cutout(x, 16, torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
    net.train()
    logits, aux = net.forward_with_aux(x)
    assert aux is not None
    loss = nn.functional.cross_entropy(logits, y) + 0.4 * nn.functional.cross_entropy(aux, y)
    assert torch.isfinite(loss)
    loss.backward()
    nn.utils.clip_grad_norm_(net.parameters(), 5.0)
    optimizer.step()
    assert any(not torch.equal(p, b) for p, b in zip(net.parameters(), before))

    from fxsculpt.ir.graph import IR

    eval_ir = IR.from_module(net, (1, 3, 32, 32), 10)
    assert eval_ir.param_count() == sum(p.numel() for p in net.parameters()) - net.aux_parameter_count()
    eval_ir.gm.eval()
    sample = data.test.tensors[0][:4]
    with torch.no_grad():
        expected = eval_ir.gm(sample).numpy()
    path = tmp_path / "eval.onnx"
    export_onnx(eval_ir.gm, sample, path)
    got = run_onnx(ort_session(path, threads=1), sample.numpy())
    assert np.max(np.abs(got - expected)) < 1e-4 * max(1.0, float(np.abs(expected).max()))


def test_darts_without_data_is_a_clear_error(tmp_path: Path) -> None:
    from fxsculpt.ir.errors import BadInputError
    from fxsculpt.passes.darts import Darts

    ir = load_ir("builtin:resnet", LoadOptions(input_shape=(1, 3, 8, 8), num_classes=4))
    ctx = Context(out_dir=tmp_path, stage_dir=tmp_path / ".stage")
    with pytest.raises(BadInputError, match="--data"):
        Darts().run(ir, ctx)


def test_cutout_zeroes_one_square_per_image() -> None:
    from fxsculpt.nas.darts.augment import cutout

    x = torch.ones(4, 3, 32, 32)
    out = cutout(x, 16, torch.Generator().manual_seed(1))
    zeros_per_image = (out[:, 0] == 0).flatten(1).sum(1)
    assert torch.all(zeros_per_image > 0) and torch.all(zeros_per_image <= 16 * 16)
    assert torch.equal(out[:, 0] == 0, out[:, 2] == 0)  # same hole in every channel
