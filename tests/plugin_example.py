"""A user's own pass in a file of their own: loaded with ``--plugin tests/plugin_example.py``."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from fxsculpt.passes import Pass, option


@dataclass
class CountOpsOptions:
    modules_only: bool = option(False, "count only call_module nodes")


class CountOps(Pass):
    """Counts the graph's nodes by operation and records the counts; leaves the graph as it is."""

    name = "count_ops"
    Options = CountOpsOptions
    preserves_semantics = True

    def run(self, ir, ctx):
        counts: Counter[str] = Counter()
        for node in ir.gm.graph.nodes:
            if node.op == "call_module":
                counts[type(ir.gm.get_submodule(node.target)).__name__] += 1
            elif not self.options.modules_only and node.op in ("call_function", "call_method"):
                counts[getattr(node.target, "__name__", str(node.target))] += 1
        ctx.record(**dict(sorted(counts.items())))
        return ir
