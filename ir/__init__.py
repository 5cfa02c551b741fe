"""fxsculpt's graph IR: a torch.fx GraphModule at module level plus per-node metadata."""

from ir.constructs import Choice, Gate, Quantizer, SearchConstruct
from ir.errors import BadInputError, BudgetError, FxsculptError, RunFailedError
from ir.graph import IR, LayerRow, NodeMeta, SculptTracer, trace
from ir.verify import verify

__all__ = [
    "IR",
    "BadInputError",
    "BudgetError",
    "Choice",
    "FxsculptError",
    "Gate",
    "LayerRow",
    "NodeMeta",
    "Quantizer",
    "RunFailedError",
    "SculptTracer",
    "SearchConstruct",
    "trace",
    "verify",
]
