"""allocator: budgeted, near-lossless post-training quantization of PyTorch models.

For every quantizable layer it chooses bits and terms (sums of low-bit residual tensors) so
that the estimated quality is highest within a memory or compute budget, applies the plan,
and measures it against the FP model and against uniform settings of the same cost.

The data flows one way through the subpackages: `profilers` (top level) measure every layer
and choice into a `ProfileTable`; `planning` turns it into a `Plan` with `solvers`;
`quantized` applies the plan and writes the packed file; `measure` compares the result with
FP, uniform settings and peers. `sources` load models and data; `cli` and `service` are the
two front ends. Names are exported lazily: `import allocator.client` needs no torch.

Example:
    >>> import allocator  # doctest: +SKIP
    >>> plan = allocator.solve(model, calibration_batches, budget="12MB")  # doctest: +SKIP
    >>> allocator.apply_plan_(model, plan)  # doctest: +SKIP
"""

from profilers.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    **dict.fromkeys(["Choice", "ProfileTable"], "profilers.types"),
    **dict.fromkeys(["EmbeddingTask", "LogitsTask", "Task"], "profilers.tasks"),
    "choice_grid": "profilers.quant.options",
    **dict.fromkeys(["profile", "solve"], ".api"),
    **dict.fromkeys(["apply_plan_", "layer_hessians"], ".quantized.apply"),
    "Budget": ".planning.budget",
    "Plan": ".planning.plan",
    **dict.fromkeys(
        ["AllocatorError", "BudgetError", "InfeasibleBudgetError", "ModelError", "PlanError", "QuantizedFileError"],
        ".errors",
    ),
    **dict.fromkeys(["Comparison", "compare"], ".measure.evaluate"),
    "export_quantized": ".quantized.export",
    "load_quantized": ".quantized.load",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = ["__version__", *sorted(_EXPORTS)]
