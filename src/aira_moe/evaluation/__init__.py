"""Multiple-choice evaluation (``aira-moe eval``)."""

from .runner import EvalArguments, evaluate

__all__ = ["EvalArguments", "evaluate"]
