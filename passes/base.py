"""The pass interface and the context every pass receives.

A pass is a class with a ``name``, a typed ``Options`` dataclass and ``run(ir, ctx) -> ir``
(DESIGN.md, "Passes"). It reports what it did through ``ctx.record`` (a summary for the
per-pass table) and ``ctx.section`` (a top-level block of ``report.json``), and writes files
only through ``ctx.stage`` so the pipeline can publish them atomically at the end.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from fxsculpt.passes.options import NoOptions, build_options

if TYPE_CHECKING:
    from fxsculpt.ir.graph import IR
    from fxsculpt.training.data import DataSplits

#: Where the pipeline puts a pass: among the user's passes, as the exporter, or after export.
Placement = Literal["user", "export", "check"]


@dataclass
class TrainSettings:
    """The shared training knobs (``--epochs``, ``--batch-size``, ``--lr``) passes default to."""

    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.05
    progress: bool = True


@dataclass
class Context:
    """Everything a pass may use besides the IR; no pass reads global state.

    ``budget`` is the parsed ``--budget`` (the hardware issue's ``Budget``), to which a pass may
    add limits it resolves (``quantize.latency_ratio``: :meth:`hardware.budget.Budget.with_limit`);
    ``target`` the hardware target's name. ``stage_dir`` is a private folder inside the output folder
    whose files are published (renamed into place) only when the whole run succeeds.
    """

    out_dir: Path
    stage_dir: Path
    data: DataSplits | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    train: TrainSettings = field(default_factory=TrainSettings)
    budget: Any = None
    target: str = "ort-cpu"
    threads: int = 1
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("fxsculpt"))
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    sections: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Path] = field(default_factory=dict)
    current_pass: str = ""
    #: Test accuracy of the model as given, before any pass (set by the pipeline when data is given);
    #: the hardware pass checks ``accuracy_drop`` budgets against it.
    accuracy_before: float | None = None
    #: The float reference of the before/after comparison (set by the pipeline): the model after
    #: the leading passes that only train it or keep its function (``train``, ``fold_bn``, ``dce``),
    #: just before the first pass that compresses or searches (or before export).
    reference_ir: IR | None = None
    #: Where passes keep checkpoints (``OUT/checkpoints``; see :mod:`training.checkpoint`); None: off.
    checkpoint_dir: Path | None = None
    #: The output folder of an interrupted run to continue (``--resume OUT``): passes resume from
    #: the checkpoints in ``resume_from/checkpoints``.
    resume_from: Path | None = None
    #: 1 for the first pass of its name in the pipeline, 2 for the second, ...: keeps checkpoints apart.
    pass_occurrence: int = 1
    #: Parallel candidate evaluation (``--workers``, ``--ray-address``): passes hand these to
    #: :func:`training.parallel.map_in_order`; 1 worker evaluates in this process.
    workers: int = 1
    ray_address: str | None = None

    def record(self, **summary: Any) -> None:
        """Add key/values to the current pass's summary (the per-pass table in reports)."""
        self.summaries.setdefault(self.current_pass, {}).update(summary)

    def section(self, name: str, content: Any) -> None:
        """Set a top-level section of ``report.json`` (e.g. ``onnx``, ``hardware``)."""
        self.sections[name] = content

    def stage(self, filename: str) -> Path:
        """A path inside the staging folder for ``filename``; published as ``out_dir/filename``."""
        path = self.stage_dir / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        self.artifacts[filename] = path
        return path

    def generator(self, salt: str = "") -> torch.Generator:
        """A torch RNG seeded from ``--seed`` and ``salt`` (e.g. the pass name): no global RNG."""
        offset = zlib.crc32(salt.encode()) if salt else 0
        return torch.Generator().manual_seed((self.seed * 1_000_003 + offset) % (2**63))


class Pass:
    """Base class of every pass: subclass, set ``name`` and ``Options``, implement ``run``.

    ``preserves_semantics`` asks the pipeline to check outputs before and after numerically.
    ``refines_float`` marks a pass that changes the weights but neither the architecture nor the
    precision (``train``): the float reference of the before/after comparison is taken after it.
    ``placement`` is ``"user"`` for ordinary passes; ``"export"`` and ``"check"`` passes are
    moved after the user's passes (export, then checks), whatever order they were named in.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    preserves_semantics: ClassVar[bool] = False
    refines_float: ClassVar[bool] = False
    placement: ClassVar[Placement] = "user"

    def __init__(self, options: Any = None, **overrides: Any) -> None:
        if options is None:
            options = build_options(self.Options, overrides, self.name)
        elif overrides:
            options = dataclasses.replace(options, **overrides)
        self.options = options

    @classmethod
    def summary_line(cls) -> str:
        """The first line of the class docstring: what the pass does, for ``cli.py passes``."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @classmethod
    def wanted(cls, ctx: Context) -> bool:
        """For ``check`` passes: whether the pipeline adds this pass unasked (e.g. a budget was given)."""
        return False

    def run(self, ir: IR, ctx: Context) -> IR:
        raise NotImplementedError
