"""The output folder publishes whole files or nothing."""

from __future__ import annotations

from fxsculpt.passes.outputs import OutputFolder, atomic_write_text


def test_publish_moves_staged_files_and_writes_reports(tmp_path):
    out = OutputFolder(tmp_path / "out")
    staged = out.stage_dir / "model.onnx"
    staged.write_bytes(b"onnx bytes")
    written = out.publish({"model.onnx": staged}, {"report.json": "{}\n"})
    out.discard()
    assert (tmp_path / "out" / "model.onnx").read_bytes() == b"onnx bytes"
    assert (tmp_path / "out" / "report.json").read_text() == "{}\n"
    assert [p.name for p in written] == ["model.onnx", "report.json"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.onnx", "report.json"]


def test_discard_without_publish_leaves_nothing(tmp_path):
    out = OutputFolder(tmp_path / "out")
    (out.stage_dir / "model.onnx").write_bytes(b"half")
    out.discard()
    assert list((tmp_path / "out").iterdir()) == []


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_reports_get_ordinary_file_permissions(tmp_path):
    import os
    import stat

    target = tmp_path / "report.json"
    atomic_write_text(target, "{}")
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    assert stat.S_IMODE(os.stat(target).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
