"""Sensitivity estimators: for every (layer, option), the loss increase when only that layer
takes that option. `fisher` (default) and `hessian` are proxies; `measured` is ground truth.

The names and defaults below are torch-free (the CLI prints them without importing torch);
the estimators themselves are exported lazily.
"""

from ..lazy import lazy_exports

PROFILER_NAMES: tuple[str, ...] = ("fisher", "hessian", "measured")
DEFAULT_PROFILER = "fisher"
DEFAULT_DRAWS: dict[str, int] = {"fisher": 2, "hessian": 1}  # pseudo-label draws per batch

_EXPORTS = {
    **dict.fromkeys(["PROFILERS", "make_profiler"], ".registry"),
    "Profiler": ".base",
    "FisherProfiler": ".fisher",
    "HessianProfiler": ".hessian",
    "MeasuredProfiler": ".measured",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = ["DEFAULT_DRAWS", "DEFAULT_PROFILER", "PROFILER_NAMES", *sorted(_EXPORTS)]
