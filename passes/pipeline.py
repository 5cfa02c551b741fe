"""Run passes in order, verify the IR between them and collect the report.

``Pipeline(["fold_bn", "dce"])`` is what ``cli.py optimize --passes fold_bn,dce`` builds.
The exporter (placement ``"export"``) is added last unless ``export=False``; passes with
placement ``"check"`` (e.g. the hardware budget check) run after it, on the exported file.
Which check passes are wanted is decided once the others ran, so that a limit a pass resolved
(``quantize.latency_ratio``) brings the hardware check in as ``--budget`` does.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fxsculpt.ir.errors import BadInputError, BudgetError
from fxsculpt.ir.graph import IR
from fxsculpt.ir.verify import verify
from fxsculpt.passes.base import Context, Pass
from fxsculpt.passes.registry import PassRegistry
from fxsculpt.training.distributed import is_main_process


@dataclass
class PassRecord:
    """One row of the per-pass table: what ran, how long, what it changed."""

    name: str
    seconds: float
    summary: dict[str, Any]
    before: dict[str, int]
    after: dict[str, int]
    verified_max_abs_diff: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seconds": round(self.seconds, 4),
            "summary": self.summary,
            "before": self.before,
            "after": self.after,
            "verified_max_abs_diff": self.verified_max_abs_diff,
        }


@dataclass
class PipelineResult:
    ir: IR
    records: list[PassRecord] = field(default_factory=list)
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    #: Set when a check pass (e.g. the hardware budget check) found the exported model over budget.
    budget_error: BudgetError | None = None


class Pipeline:
    """An ordered list of passes; names are looked up in ``registry`` (built-ins by default).

    ``options`` maps a pass name to raw option values (strings from ``--set`` or TOML values),
    checked against that pass's typed ``Options``.
    """

    def __init__(
        self,
        passes: Sequence[Pass | str],
        registry: PassRegistry | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        export: bool = True,
        verify_atol: float = 1e-4,
    ) -> None:
        self.registry = registry or PassRegistry.with_builtins()
        options = dict(options or {})
        named = {p if isinstance(p, str) else p.name for p in passes}
        if export and "export" in self.registry:
            named.add("export")
        for pass_name, values in options.items():
            cls = self.registry.get(pass_name)  # unknown pass in --set: a clear error
            if pass_name not in named and cls.placement != "check":
                raise BadInputError(f"options were given for pass '{pass_name}', which is not in --passes")
            if cls.placement == "check":
                cls(**dict(values))  # checked now, although the pass may only be added later
        instances: list[Pass] = []
        for item in passes:
            if isinstance(item, Pass):
                instances.append(item)
            else:
                cls = self.registry.get(item)
                instances.append(cls(**dict(options.get(item, {}))))
        if export and "export" in self.registry and not any(p.placement == "export" for p in instances):
            cls = self.registry.get("export")
            instances.append(cls(**dict(options.get("export", {}))))
        self.passes = self._ordered(instances)
        self.options = options
        self.verify_atol = verify_atol

    @staticmethod
    def _ordered(instances: list[Pass]) -> list[Pass]:
        rank = {"user": 0, "export": 1, "check": 2}
        return sorted(instances, key=lambda p: rank[p.placement])  # stable: user order is kept

    def with_wanted_checks(self, ctx: Context) -> list[Pass]:
        """The passes to run: ours plus every registered check pass that ``ctx`` asks for."""
        present = {p.name for p in self.passes}
        extra = [
            cls(**dict(self.options.get(cls.name, {})))
            for cls in self.registry.classes()
            if cls.placement == "check" and cls.name not in present and cls.wanted(ctx)
        ]
        return self._ordered(self.passes + extra)

    def run(self, ir: IR, ctx: Context) -> PipelineResult:
        """Run every pass on ``ir``; verification failures raise ``RunFailedError``.

        A ``BudgetError`` from a check pass does not abort: the remaining checks run and the
        error is returned in ``budget_error`` so the caller can publish the over-budget report.
        """
        result = PipelineResult(ir=ir)
        result.accuracy_before = _test_accuracy(ir, ctx)
        ctx.accuracy_before = result.accuracy_before
        ctx.reference_ir = None
        occurrences: dict[str, int] = {}
        for pass_ in [p for p in self.passes if p.placement != "check"]:
            if ctx.reference_ir is None and not (pass_.refines_float or pass_.preserves_semantics):
                ctx.reference_ir = ir.clone()  # the float model before compression (report's before/after)
            ir = self._run_one(pass_, ir, ctx, result, occurrences)
        if ctx.reference_ir is None:
            ctx.reference_ir = ir.clone()
        for pass_ in [p for p in self.with_wanted_checks(ctx) if p.placement == "check"]:
            ir = self._run_one(pass_, ir, ctx, result, occurrences)
        result.ir = ir
        result.accuracy_after = _test_accuracy(ir, ctx)
        return result

    def _run_one(
        self, pass_: Pass, ir: IR, ctx: Context, result: PipelineResult, occurrences: dict[str, int]
    ) -> IR:
        """Run one pass, verify its IR and record it in ``result``."""
        if pass_.placement != "user" and not is_main_process():
            return ir  # under torchrun only rank 0 exports, measures and checks the budget
        occurrences[pass_.name] = occurrences.get(pass_.name, 0) + 1
        ctx.pass_occurrence = occurrences[pass_.name]
        ctx.current_pass = pass_.name
        ctx.summaries.setdefault(pass_.name, {})
        before = ir.summary()
        reference = ir.clone() if pass_.preserves_semantics else None
        ctx.logger.info("pass %s ...", pass_.name)
        start = time.perf_counter()
        try:
            ir = pass_.run(ir, ctx)
        except BudgetError as exc:
            if pass_.placement != "check":
                raise  # a search pass found the budget impossible: nothing to hand over
            result.budget_error = exc  # the model exists but misses its budget: report it
        seconds = time.perf_counter() - start
        diff = verify(ir, reference, atol=self.verify_atol, pass_name=pass_.name)
        result.records.append(
            PassRecord(pass_.name, seconds, dict(ctx.summaries[pass_.name]), before, ir.summary(), diff)
        )
        return ir


def _test_accuracy(ir: IR, ctx: Context) -> float | None:
    """Top-1 accuracy on the test split, when data was given and the model is a classifier."""
    if ctx.data is None or ir.num_classes is None:
        return None
    from fxsculpt.training.loop import evaluate

    _, accuracy = evaluate(ir.gm, ctx.data.test, batch_size=256, device=ctx.device)
    return accuracy
