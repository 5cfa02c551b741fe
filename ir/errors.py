"""Errors a user can act on, each mapped to the CLI's documented exit code.

The CLI prints ``error: <message>`` on one line and exits with ``exit_code``; anything
that is not an :class:`FxsculptError` is a bug and is reported as such.
"""

from __future__ import annotations


class FxsculptError(Exception):
    """Base of every error that is the user's to fix; ``exit_code`` is what the CLI returns."""

    exit_code: int = 2


class BadInputError(FxsculptError):
    """Unreadable or untraceable model, bad data, bad option or bad usage (exit code 2)."""

    exit_code = 2


class BudgetError(FxsculptError):
    """A budget is impossible or the final model misses it (exit code 3)."""

    exit_code = 3


class RunFailedError(FxsculptError):
    """The run itself failed: training diverged (NaN/inf) or ONNX parity did not hold (exit code 4)."""

    exit_code = 4


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type name when the message is empty): how a
    library's error is quoted inside one of ours, which must fit on one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
