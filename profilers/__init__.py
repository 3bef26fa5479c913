"""Profilers: quantizer math, cost model and sensitivity estimators.

- `types`: what profiling produces and every later stage reads (`Choice`, `LayerSpec`,
  `ProfileTable`); torch-free, so a planning client can read profiles without torch.
- `quant/`: pure tensor functions of the quantizers (round to nearest, GPTQ), the options of
  a layer and their error stacks, and the exact cost of every choice.
- `estimators/`: the sensitivity estimators (`fisher`, `hessian`, `measured`).
- `capture`, `input_hessians`, `layers`, `tasks`: what the estimators read from a model.

Imports torch, numpy and pydantic only; never `solvers` or `allocator`. Names are exported
lazily, so `import profilers` costs nothing until one is used.
"""

from .lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(
        ["Choice", "ChoiceProfile", "DataSplit", "LayerProfile", "LayerSpec", "ProfileError", "ProfileTable",
         "Validation"],
        ".types",
    ),
    **dict.fromkeys(["layer_bops", "layer_bytes", "weight_bytes"], ".quant.cost"),
    **dict.fromkeys(
        ["as_matrix", "dequantize", "dequantize_terms", "quantize_groups", "quantize_residual"],
        ".quant.quantize",
    ),
    **dict.fromkeys(["choice_grid", "expand_choices"], ".quant.options"),
    **dict.fromkeys(["fake_quantize", "reconstruct"], ".quant.rounding"),
    **dict.fromkeys(["Estimates", "LayerEstimate", "Profiler", "ProgressFn", "fingerprint_batches"],
                    ".estimators.base"),
    **dict.fromkeys(["PROFILERS", "make_profiler"], ".estimators"),
    "FisherProfiler": ".estimators.fisher",
    "HessianProfiler": ".estimators.hessian",
    **dict.fromkeys(["MeasuredProfiler", "OutputMeter"], ".estimators.measured"),
    **dict.fromkeys(["QuantTarget", "find_targets"], ".layers"),
    **dict.fromkeys(["EmbeddingTask", "LogitsTask", "Task", "infer_task"], ".tasks"),
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
