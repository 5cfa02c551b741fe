"""The installed package adds one top-level name, ``fxsculpt``, and nothing that could clash.

Built as a wheel from this checkout and installed into a fresh virtual environment (its
third-party needs come from the environment running the tests, through a ``.pth`` line),
the package must provide ``fxsculpt.passes`` and the ``fxsculpt`` command, and must not
provide ``training``, ``passes`` or any other of the repository's top-level folders.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPO_FOLDERS = ["ir", "passes", "hardware", "zoo", "training", "nas", "quant", "cli"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (found,) = out.glob("fxsculpt-*.whl")
    return found


def test_wheel_holds_only_the_fxsculpt_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
    assert tops == {"fxsculpt", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}


def test_fresh_environment_imports_fxsculpt_and_not_the_folders(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # torch, onnx, … from the environment running the tests; a plain path, so its own .pth
    # files (the checkout's editable install among them) are not run.
    (site / "third_party.pth").write_text(sysconfig.get_path("purelib") + "\n", encoding="utf-8")
    probe = (
        "import importlib.util, json\n"
        "import fxsculpt.passes, fxsculpt.cli\n"
        f"clashes = [n for n in {REPO_FOLDERS!r} if importlib.util.find_spec(n) is not None]\n"
        "print(json.dumps({'passes': fxsculpt.passes.__file__, 'clashes': clashes}))\n"
    )
    run = subprocess.run([str(python), "-c", probe], cwd=tmp_path, check=True, capture_output=True, text=True)
    import json

    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["clashes"] == []
    assert Path(seen["passes"]).is_relative_to(site / "fxsculpt")
    # The console script and `python -m fxsculpt` are the same program as `python cli.py`.
    for command in ([str(env_dir / "bin" / "fxsculpt"), "passes"], [str(python), "-m", "fxsculpt", "passes"]):
        listed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
        assert listed.returncode == 0, listed.stderr
        assert "quantize:" in listed.stdout
