"""fxsculpt's graph IR: a torch.fx GraphModule at module level plus per-node metadata."""

from fxsculpt.ir.constructs import Choice, Gate, Quantizer, SearchConstruct
from fxsculpt.ir.errors import BadInputError, BudgetError, FxsculptError, RunFailedError
from fxsculpt.ir.graph import IR, LayerRow, NodeMeta, SculptTracer, trace
from fxsculpt.ir.verify import verify

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
