"""Profilers: quantizer math, cost model and sensitivity estimators.

Imports torch, numpy and pydantic only; never `solvers` or `allocator`.
"""

from typing import Any

from .base import Estimates, LayerEstimate, Profiler, ProgressFn, fingerprint_batches
from .cost import layer_bops, layer_bytes, weight_bytes
from .fisher import FisherProfiler
from .hessian import HessianProfiler
from .layers import QuantTarget, find_targets
from .measured import MeasuredProfiler, OutputMeter
from .options import expand_choices
from .quantize import as_matrix, dequantize, dequantize_terms, fake_quantize, quantize_groups, quantize_residual
from .specs import Choice, ChoiceProfile, LayerProfile, LayerSpec, ProfileError, ProfileTable, Validation
from .tasks import EmbeddingTask, LogitsTask, Task, infer_task

PROFILERS: dict[str, type[Profiler]] = {
    FisherProfiler.name: FisherProfiler,
    HessianProfiler.name: HessianProfiler,
    MeasuredProfiler.name: MeasuredProfiler,
}


def make_profiler(name: str, **settings: Any) -> Profiler:
    """A profiler by name (`fisher`, `hessian`, `measured`) with its settings; settings a
    profiler does not take are ignored (e.g. `draws` for `measured`)."""
    if name not in PROFILERS:
        raise ProfileError(f"unknown profiler {name!r}; choose one of {', '.join(PROFILERS)}")
    cls = PROFILERS[name]
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in settings.items() if k in accepted and v is not None})


__all__ = [
    "PROFILERS",
    "Choice",
    "ChoiceProfile",
    "EmbeddingTask",
    "Estimates",
    "FisherProfiler",
    "HessianProfiler",
    "LayerEstimate",
    "LayerProfile",
    "LayerSpec",
    "LogitsTask",
    "MeasuredProfiler",
    "OutputMeter",
    "ProfileError",
    "ProfileTable",
    "Profiler",
    "ProgressFn",
    "QuantTarget",
    "Task",
    "Validation",
    "as_matrix",
    "dequantize",
    "dequantize_terms",
    "expand_choices",
    "fake_quantize",
    "find_targets",
    "fingerprint_batches",
    "infer_task",
    "layer_bops",
    "layer_bytes",
    "make_profiler",
    "quantize_groups",
    "quantize_residual",
    "weight_bytes",
]
