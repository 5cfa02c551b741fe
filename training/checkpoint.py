"""Checkpoints that survive a killed run: the whole state of a training phase or search, saved atomically.

A :class:`Checkpointer` is bound to one folder, ``OUT/checkpoints/<pass>[/<phase>]``. It lives in
the run's output folder, not in the staging folder, because a run killed with SIGKILL never
reaches the code that would publish staged files. Each save writes ``ckpt-<step>.pt`` through a
temporary file in the same folder, ``fsync`` and ``os.replace`` (atomic on one file system), so a
file with the final name is always complete: a kill leaves the previous checkpoint intact.

States hold only tensors, dicts, lists, tuples and plain scalars, so they load with
``torch.load(weights_only=True)``, which runs no code from the file. RNG states (torch CPU and CUDA,
NumPy, Python's ``random`` and named ``torch.Generator`` objects) are converted to tensors by
:func:`capture_rng` and put back by :func:`restore_rng`: together with the weights, optimizer
states and counters this makes a resumed run continue exactly where the killed one was on CPU.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fxsculpt.ir.errors import BadInputError, first_line

if TYPE_CHECKING:
    from fxsculpt.passes.base import Context

#: Name of the checkpoint folder inside an output folder.
CHECKPOINT_FOLDER = "checkpoints"
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` through a temporary file, ``fsync`` and a rename: never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class Checkpointer:
    """Saves and loads numbered checkpoints (``ckpt-<step>.pt``) in one folder.

    ``resume=False`` starts afresh: the writer removes checkpoints a previous run left in the
    folder, and :meth:`load_latest` returns None. ``resume=True`` keeps them and loads the newest
    readable one. ``writer=False`` (every rank but 0 under torchrun) never writes or removes
    anything but still loads. The newest ``keep`` checkpoints are kept, older ones removed.
    """

    def __init__(self, folder: Path, *, resume: bool = False, keep: int = 2, writer: bool = True) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.folder = Path(folder)
        self.resume = resume
        self.keep = keep
        self.writer = writer
        if writer and not resume:
            for _, path in self._files():
                path.unlink(missing_ok=True)

    def _files(self) -> list[tuple[int, Path]]:
        """Checkpoint files in the folder as (step, path), oldest first."""
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.iterdir():
            match = _NAME.match(path.name)
            if match and path.is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def steps(self) -> list[int]:
        """The steps (epochs, episodes) that have a checkpoint, oldest first."""
        return [step for step, _ in self._files()]

    def save(self, step: int, state: Mapping[str, Any]) -> Path | None:
        """Write ``state`` as the checkpoint of ``step`` atomically; returns its path (None when not the writer)."""
        if not self.writer:
            return None
        if step < 0:
            raise ValueError(f"checkpoint step must be >= 0, got {step}")
        path = self.folder / f"ckpt-{step:06d}.pt"
        atomic_torch_save({**state, "step": step}, path)
        for _, old in self._files()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self, config: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """The newest readable checkpoint when resuming, else None.

        ``config`` lists the settings the saved state depends on (epochs, batch size, ...): a
        checkpoint made with other values is refused with a one-line :class:`BadInputError`,
        since continuing it would silently mix two runs. A file that cannot be read (disk
        trouble) is skipped in favour of the one before it.
        """
        if not self.resume:
            return None
        for _, path in reversed(self._files()):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # unreadable: fall back to the previous checkpoint
                continue
            if not isinstance(state, dict):
                continue
            if config is not None:
                check_config(path, state.get("config"), config)
            return state
        return None

    def clear(self) -> None:
        """Remove the folder and its checkpoints (the writer only)."""
        if self.writer:
            shutil.rmtree(self.folder, ignore_errors=True)


def check_config(path: Path, saved: Any, expected: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose recorded settings differ from this run's."""
    saved = saved if isinstance(saved, dict) else {}
    differing = [key for key in expected if saved.get(key) != expected[key]]
    if differing:
        key = differing[0]
        raise BadInputError(
            f"checkpoint {path} was made with {key}={saved.get(key)!r} but this run has {key}={expected[key]!r}; "
            "resume with the same command and settings, or start afresh in another output folder"
        )


# -- RNG states ------------------------------------------------------------------------------


def capture_rng(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG state a run may draw from, as tensors and plain values (loadable with weights_only)."""
    np_state: tuple[Any, ...] = tuple(np.random.get_state(legacy=True))
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss": py_gauss,
        },
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Put back what :func:`capture_rng` saved; ``generators`` are restored in place by name."""
    torch.set_rng_state(state["torch"])
    np_saved = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_saved["keys"].numpy().astype(np.uint32),
            int(np_saved["pos"]),
            int(np_saved["has_gauss"]),
            float(np_saved["cached_gaussian"]),
        )
    )
    py_saved = state["python"]
    random.setstate(
        (int(py_saved["version"]), tuple(int(v) for v in py_saved["internal"]), py_saved["gauss"])
    )
    saved_generators = state.get("generators", {})
    for name, generator in (generators or {}).items():
        if name not in saved_generators:
            raise KeyError(f"the checkpoint has no state for the generator '{name}'")
        generator.set_state(saved_generators[name])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):  # fewer devices than when saved: keep what there is
            torch.cuda.set_rng_state_all(state["cuda"])


def training_state(
    *,
    modules: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer | None] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The whole state of a search at an epoch or episode boundary, ready for :meth:`Checkpointer.save`.

    Module state dicts (weights, architecture parameters, buffers), optimizer states, every RNG
    (with the global torch RNG of every rank under torchrun: each rank draws its own dropout
    masks) and ``extra`` (history, counters; tensors, dicts, lists and scalars only). Every rank
    must call it (it gathers the RNG states); only the main process's checkpointer writes.
    """
    from fxsculpt.training.distributed import gather_objects

    return {
        "modules": {name: module.state_dict() for name, module in modules.items()},
        "optimizers": {name: opt.state_dict() for name, opt in (optimizers or {}).items() if opt is not None},
        "rng": capture_rng(generators),
        "rank_torch_rng": gather_objects(torch.get_rng_state()),
        "extra": extra,
    }


def restore_training_state(
    state: Mapping[str, Any],
    *,
    modules: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer | None] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
) -> dict[str, Any]:
    """Put back what :func:`training_state` saved (in place); returns its ``extra``.

    Call it where the saved run was when it saved (after the same setup), so that the RNG
    states continue exactly. A state that does not fit the modules or optimizers is a
    one-line :class:`BadInputError`.
    """
    from fxsculpt.training.distributed import rank

    try:
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        for name, opt in (optimizers or {}).items():
            if opt is not None:
                opt.load_state_dict(state["optimizers"][name])
    except (RuntimeError, ValueError, KeyError) as exc:
        detail = first_line(exc)
        raise BadInputError(
            f"the checkpoint does not fit this run ({detail}); resume with the same command"
        ) from exc
    restore_rng(state["rng"], generators)
    per_rank = state.get("rank_torch_rng") or [state["rng"]["torch"]]
    if rank() >= len(per_rank):
        raise BadInputError(f"the checkpoint was saved by {len(per_rank)} processes; resume with as many")
    torch.set_rng_state(per_rank[rank()])
    return dict(state.get("extra", {}))


def all_finite(module: torch.nn.Module) -> bool:
    """Whether every floating-point parameter and buffer of ``module`` is finite (worth checkpointing)."""
    tensors = [*module.parameters(), *module.buffers()]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


# -- the folder of a pass ------------------------------------------------------------------------


def checkpoint_root(ctx: Context) -> Path | None:
    """The run's checkpoint folder: ``RESUME/checkpoints`` when resuming, else ``ctx.checkpoint_dir``."""
    resume_from = getattr(ctx, "resume_from", None)
    if resume_from is not None:
        return Path(resume_from) / CHECKPOINT_FOLDER
    checkpoint_dir = getattr(ctx, "checkpoint_dir", None)
    return Path(checkpoint_dir) if checkpoint_dir is not None else None


def pass_checkpointer(ctx: Context, phase: str = "", *, keep: int = 2) -> Checkpointer | None:
    """The checkpointer of the running pass (and one of its phases), or None when checkpointing is off.

    The folder is ``checkpoints/<pass>`` (``<pass>.2`` for the second pass of that name in a
    pipeline), plus ``/<phase>`` when a pass trains in several phases (e.g. ``search`` and
    ``retrain``). Only the main process writes (see :mod:`training.distributed`).
    """
    from fxsculpt.training.distributed import is_main_process

    root = checkpoint_root(ctx)
    if root is None:
        return None
    occurrence = int(getattr(ctx, "pass_occurrence", 1) or 1)
    name = ctx.current_pass or "pass"
    folder = root / (name if occurrence == 1 else f"{name}.{occurrence}")
    if phase:
        folder = folder / phase
    resume = getattr(ctx, "resume_from", None) is not None
    return Checkpointer(folder, resume=resume, keep=keep, writer=is_main_process())


RUN_SETTINGS = "run.json"


def record_run_settings(out_dir: Path, settings: Mapping[str, Any], resume: bool) -> None:
    """Remember what a run was started with (``checkpoints/run.json``), or check a resume against it.

    Resuming with other settings (another seed, pass option, data limit, ...) would continue
    the checkpoints of one run as another: it is refused, naming the first setting that differs.
    Only the main process writes the file.
    """
    import json

    from fxsculpt.training.distributed import is_main_process

    path = Path(out_dir) / CHECKPOINT_FOLDER / RUN_SETTINGS
    current = json.loads(json.dumps(dict(settings), default=str))  # the JSON view that is stored
    if resume:
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # older or partial folder: the per-phase checks still apply
        for key in sorted(set(saved) | set(current)):
            if saved.get(key) != current.get(key):
                raise BadInputError(
                    f"--resume {out_dir}: the run was started with {key}={saved.get(key)!r}, "
                    f"this command has {key}={current.get(key)!r}; resume with the same command"
                )
        return
    if is_main_process():
        from fxsculpt.passes.outputs import atomic_write_text

        atomic_write_text(path, json.dumps(current, indent=2, sort_keys=True) + "\n")


def has_checkpoints(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds checkpoints of an unfinished run."""
    root = Path(out_dir) / CHECKPOINT_FOLDER
    return root.is_dir() and any(_NAME.match(p.name) for p in root.rglob("ckpt-*.pt"))
