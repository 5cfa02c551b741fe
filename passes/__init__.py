"""Graph passes. Every module here that defines a named ``Pass`` subclass is a built-in pass."""

from fxsculpt.passes.base import Context, Pass, TrainSettings
from fxsculpt.passes.options import option
from fxsculpt.passes.pipeline import Pipeline
from fxsculpt.passes.registry import PassRegistry

__all__ = ["Context", "Pass", "PassRegistry", "Pipeline", "TrainSettings", "option"]
