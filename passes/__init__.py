"""Graph passes. Every module here that defines a named ``Pass`` subclass is a built-in pass."""

from passes.base import Context, Pass, TrainSettings
from passes.options import option
from passes.pipeline import Pipeline
from passes.registry import PassRegistry

__all__ = ["Context", "Pass", "PassRegistry", "Pipeline", "TrainSettings", "option"]
