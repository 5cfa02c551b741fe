"""Tracing a user's model with torch.fx, with an error a user can act on when it fails.

torch.fx traces by running ``forward`` on proxies, so Python that needs a real value
(``if x.sum() > 0:``, ``len(x)``, ``for row in x:``) raises deep inside torch. This module
turns any such failure into one line that names the user's own source line (the deepest
frame outside torch and outside fxsculpt's ``ir`` package) and says what to do: mark the
offending submodule as a leaf, or export the model with ``torch.export`` and load the .pt2.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch
from torch import fx, nn

from fxsculpt.ir.errors import BadInputError
from fxsculpt.ir.graph import trace

_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_IR_DIR = str(Path(__file__).resolve().parent)
_STDLIB_DIR = str(Path(os.__file__).resolve().parent)


@dataclass
class UserFrame:
    """Where in the user's code tracing failed, and the module whose ``forward`` that was."""

    filename: str
    lineno: int
    code: str
    module: nn.Module | None


def _is_internal(filename: str) -> bool:
    """Frames in torch, in this package's ``ir`` folder, in the stdlib or in generated code."""
    if filename.startswith("<"):
        return True
    try:
        resolved = str(Path(filename).resolve())
    except OSError:
        return True
    if resolved.startswith(_TORCH_DIR + os.sep) or resolved.startswith(_IR_DIR + os.sep):
        return True
    return resolved.startswith(_STDLIB_DIR + os.sep) and "site-packages" not in resolved


def user_frame(tb: TracebackType | None) -> UserFrame | None:
    """The deepest traceback frame in the user's code, with the module it belongs to."""
    found: UserFrame | None = None
    while tb is not None:
        frame = tb.tb_frame
        filename = frame.f_code.co_filename
        if not _is_internal(filename):
            summary = traceback.FrameSummary(filename, tb.tb_lineno, frame.f_code.co_name)
            owner = frame.f_locals.get("self")
            found = UserFrame(
                filename,
                tb.tb_lineno,
                (summary.line or "").split("  # ")[0].strip(),
                owner if isinstance(owner, nn.Module) else None,
            )
        tb = tb.tb_next
    return found


def _display_path(filename: str) -> str:
    """``filename`` relative to the current directory when it lies below it."""
    try:
        return os.path.relpath(filename) if Path(filename).resolve().is_relative_to(Path.cwd()) else filename
    except (OSError, ValueError):
        return filename


def _reason(exc: BaseException) -> str:
    """A short statement of why fx failed, on one line."""
    text = " ".join(str(exc).split())
    if "cannot be iterated" in text:
        return "iteration over a traced tensor (a Python loop or *args over it)"
    if "len" in text and "not supported" in text:
        return "len() of a traced tensor"
    if "control flow" in text:
        return "data-dependent control flow (a traced tensor decides a Python branch or value)"
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def trace_module(module: nn.Module, leaf_modules: Iterable[str] = ()) -> fx.GraphModule:
    """Trace ``module`` at module level with :class:`ir.graph.SculptTracer`.

    ``leaf_modules`` are class names or qualified submodule names kept opaque (one
    ``call_module`` node each). On failure raises :class:`BadInputError` with one line: the
    user's file:line and code, the reason, and the fix.
    """
    leaves = tuple(leaf_modules)
    try:
        return trace(module, leaves)
    except Exception as exc:
        frame = user_frame(exc.__traceback__)
        model_name = type(module).__name__
        where = "in its forward"
        fixes = "export it with torch.export (torch.export.save(...)) and load the .pt2 file"
        if frame is not None:
            where = f"at {_display_path(frame.filename)}:{frame.lineno}"
            if frame.code:
                where += f" `{frame.code}`"
            if frame.module is not None and frame.module is not module:
                fixes = (
                    f"mark the module as a leaf with --leaf-modules {type(frame.module).__name__} "
                    f"(it then stays one opaque node), or {fixes}"
                )
            else:
                fixes = f"rewrite that line without it, move it into a submodule and pass --leaf-modules, or {fixes}"
        message = f"cannot trace {model_name} with torch.fx {where}: {_reason(exc)}; {fixes}"
        raise BadInputError(message) from exc
