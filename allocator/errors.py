"""Errors a user can act on. Each message is one line naming the problem and the fix."""

from __future__ import annotations

from profilers.types import ProfileError

__all__ = [
    "USER_ERRORS",
    "AllocatorError",
    "BudgetError",
    "InfeasibleBudgetError",
    "ModelError",
    "PlanError",
    "QuantizedFileError",
    "SolveTimeoutError",
]


class AllocatorError(Exception):
    """Base class of the errors the CLI prints as one line (exit status 2)."""


class BudgetError(AllocatorError, ValueError):
    """A budget string cannot be read."""


class InfeasibleBudgetError(AllocatorError):
    """No plan fits the budget; the message gives the smallest budget that would."""


class SolveTimeoutError(AllocatorError):
    """The solver ran out of time before it found any plan (with a plan, the status says TIMEOUT)."""


class ModelError(AllocatorError):
    """A model or its data cannot be loaded."""


class PlanError(AllocatorError):
    """A plan file is missing, corrupt, or does not fit the model it is applied to."""


class QuantizedFileError(AllocatorError):
    """A packed file cannot be read or does not describe a quantized model."""


# Everything the CLI reports as a one-line error instead of a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (AllocatorError, ProfileError)
