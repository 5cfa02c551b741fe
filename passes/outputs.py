"""The output folder: files are staged privately and published only when a run succeeds.

A run that fails or is interrupted leaves no ``model.onnx`` or ``report.json`` that looks
complete: passes write into a hidden staging folder, and :meth:`OutputFolder.publish`
renames each file into place (``os.replace`` is atomic on one file system), report last.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from fxsculpt.ir.errors import BadInputError


def _default_file_mode() -> int:
    """The mode a plainly created file gets (0o666 less the umask); mkstemp's is 0o600."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _default_file_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class OutputFolder:
    """``out_dir`` plus a private staging folder inside it, removed whatever happens."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BadInputError(f"cannot create output folder {self.out_dir}: {exc.strerror}") from exc
        if not os.access(self.out_dir, os.W_OK):
            raise BadInputError(f"output folder {self.out_dir} is not writable")
        self.stage_dir = Path(tempfile.mkdtemp(prefix=".fxsculpt-staging-", dir=self.out_dir))

    def publish(self, artifacts: Mapping[str, Path], report_files: Mapping[str, str]) -> list[Path]:
        """Move staged artifacts into place, then write the report files; returns what was written."""
        written: list[Path] = []
        for name, staged in artifacts.items():
            if not staged.exists():
                continue
            target = self.out_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)
            written.append(target)
        for name, text in report_files.items():
            target = self.out_dir / name
            atomic_write_text(target, text)
            written.append(target)
        return written

    def discard(self) -> None:
        """Remove the staging folder and everything in it."""
        shutil.rmtree(self.stage_dir, ignore_errors=True)
