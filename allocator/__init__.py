"""allocator: budgeted, near-lossless post-training quantization of PyTorch models.

For every quantizable layer it chooses bits and terms (sums of low-bit residual tensors) so
that the estimated quality is highest within a memory or compute budget, applies the plan,
and measures it against the FP model and against uniform settings of the same cost.

Example:
    >>> import allocator  # doctest: +SKIP
    >>> plan = allocator.solve(model, calibration_batches, budget="12MB")  # doctest: +SKIP
    >>> allocator.apply_plan_(model, plan)  # doctest: +SKIP
"""

from profilers.specs import Choice, ProfileTable
from profilers.tasks import EmbeddingTask, LogitsTask, Task

from .api import choice_grid, profile, solve
from .apply import apply_plan_
from .budget import Budget
from .errors import AllocatorError, BudgetError, InfeasibleBudgetError, ModelError, PlanError
from .evaluate import Comparison, compare
from .export import QuantizedFileError, export_quantized, load_quantized
from .plan import Plan

__version__ = "0.1.0"

__all__ = [
    "AllocatorError",
    "Budget",
    "BudgetError",
    "Choice",
    "Comparison",
    "EmbeddingTask",
    "InfeasibleBudgetError",
    "LogitsTask",
    "ModelError",
    "Plan",
    "PlanError",
    "ProfileTable",
    "QuantizedFileError",
    "Task",
    "__version__",
    "apply_plan_",
    "choice_grid",
    "compare",
    "export_quantized",
    "load_quantized",
    "profile",
    "solve",
]
