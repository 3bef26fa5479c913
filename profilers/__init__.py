"""Profilers: quantizer math, cost model and sensitivity estimators.

Imports torch, numpy and pydantic only; never `solvers` or `allocator`.
"""

from .cost import layer_bops, layer_bytes, weight_bytes
from .fisher import ProgressFn, profile_fisher
from .layers import QuantTarget, find_targets
from .quantize import (
    as_matrix,
    dequantize,
    dequantize_terms,
    fake_quantize,
    quantize_groups,
    quantize_residual,
)
from .specs import Choice, ChoiceProfile, LayerProfile, LayerSpec, ProfileError, ProfileTable
from .tasks import EmbeddingTask, LogitsTask, Task, infer_task

__all__ = [
    "Choice",
    "ChoiceProfile",
    "EmbeddingTask",
    "LayerProfile",
    "LayerSpec",
    "LogitsTask",
    "ProfileError",
    "ProfileTable",
    "ProgressFn",
    "QuantTarget",
    "Task",
    "as_matrix",
    "dequantize",
    "dequantize_terms",
    "fake_quantize",
    "find_targets",
    "infer_task",
    "layer_bops",
    "layer_bytes",
    "profile_fisher",
    "quantize_groups",
    "quantize_residual",
    "weight_bytes",
]
