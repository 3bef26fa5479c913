"""`allocator apply`: quantize the model by the plan and write it packed."""

import copy
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from profilers.quant.options import needs_hessian

from ..errors import AllocatorError
from .app import app, report
from .options import PlanArg, PlanModel, PlanModelArg, Progress, RecordedDataOptions, with_options
from .profile import cluster_summary
from .setup import check_outputs, check_weights, load_setup, model_and_plan

__all__ = ["apply"]


@app.command()
@with_options
def apply(
    model: PlanModelArg = None,
    plan_file: PlanArg = None,
    *,
    model_option: PlanModel = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", metavar="OUT.safetensors|OUT.gguf",
                     help="The file to write: allocator's packed safetensors file, or for a plan solved with --format"
                          " gguf a .gguf file llama.cpp runs. [default: model.allocator.safetensors, or"
                          " model.allocator.gguf for a GGUF plan]"),
    ] = None,
    check: Annotated[
        bool, typer.Option("--check/--no-check", help="Reload the file and compare it with the fake-quantized model.")
    ] = True,
    data: RecordedDataOptions,
    ray: Annotated[
        str | None,
        typer.Option(
            metavar="ADDRESS",
            help="Round the blocks of a GPTQ plan on a Ray cluster: `local` (started here), `local:N`, or a running"
            " cluster's address (HOST:PORT, auto). Workers read their block's weights from the model file and take"
            " its H from the recorded inputs; the file written is the same. A --sequential plan is rounded here."
            " Needs pip install 'allocator[distributed]'.",
        ),
    ] = None,
    progress: Progress = True,
) -> None:
    """Quantize the model by the plan and write it: packed safetensors (reload with allocator.load_quantized), or
    a GGUF file for a plan of llama.cpp block types (--format gguf)."""
    from profilers.estimators.base import fingerprint_batches

    from ..planning.plan import Plan
    from ..quantized.apply import quantize_plan_
    from ..quantized.load import load_quantized
    from ..sources import DEFAULT_MODEL
    from ..sources.gguf import load_gguf
    from ..sources.models import load_model

    model, plan_file = model_and_plan(model, plan_file, model_option)
    plan = Plan.load(plan_file)
    output = _output(output, plan.target_format)
    check_outputs({"--output": output}, [plan_file, model, data.data])
    name = model or plan.model_name or DEFAULT_MODEL
    setup = None
    tuned = plan.refine_steps > 0 or plan.tune_steps > 0
    calibrated = needs_hessian(plan.method) or tuned
    # A causal LM is read block by block, unless the check, --refine or --tune need the whole model, or a GGUF
    # plan is written (its writer reads the source file's tensors next to the model's).
    lazy = not (check or tuned or plan.target_format == "gguf")
    if calibrated or check:  # GPTQ, --refine and --tune run on the plan's calibration data; the check on held-out
        setup = load_setup(name, data.resolve(plan.data), lazy=lazy)
        loaded = setup.loaded
    else:
        loaded = load_model(name, lazy=lazy)
    check_weights(plan.model_fingerprint, loaded, plan_file, "solve again for this model")
    source = _gguf_source(plan, loaded)
    calibration = None
    if calibrated:
        assert setup is not None
        if fingerprint_batches(setup.calib) != plan.data_fingerprint:
            raise AllocatorError(
                "this plan was profiled on other calibration data; pass the same --data, --calibration,"
                " --seed, --max-length and --batch-size as when profiling"
            )
        calibration = setup.calib  # GPTQ's `H`, block by block as the layers are written
    t0 = time.perf_counter()
    # Quantized by the plan (the packed file stores exactly its weights); a copy only when the check needs it,
    # since the export reads the tensors the plan does not quantize from the model (fp16 either way).
    fake = copy.deepcopy(loaded.model) if check else loaded.model
    with report.progress(progress) as update, cluster_summary(ray is not None):
        made = quantize_plan_(fake, plan, calibration=calibration, task=loaded.task, progress=update, ray=ray)
    if made.refined:
        report.refinement(made.refined, plan.refine_steps)
    if made.tuned is not None:
        report.tuning(made.tuned)
    _write(loaded, plan, output, source, made.layers, time.perf_counter() - t0)
    if check:
        import torch

        assert setup is not None and loaded.task is not None
        if source is not None:
            reloaded = load_gguf(output, name=str(output)).model
        else:  # the exact weights (float32, dequantized), not the kernels' bfloat16 path
            reloaded = load_quantized(output, kernels=False)
        batch = setup.data.evals[0]
        with torch.no_grad():
            a, b = loaded.task.forward(fake, batch), loaded.task.forward(reloaded, batch)
        report.line(f"reloaded model vs fake-quantized model: max |difference| {float((a - b).abs().max()):.2e}")


def _write(loaded: Any, plan: Any, output: Path, source: Any, stored: dict, seconds: float) -> None:
    """Write the file of the plan's format, and say how its size compares with the prediction."""
    from ..planning.budget import format_bytes
    from ..quantized.export import export_quantized

    t0 = time.perf_counter()
    if source is not None:
        from ..quantized.gguf_export import export_gguf

        export_gguf(loaded.model, plan, output, source=source, stored=stored)
    else:
        export_quantized(loaded.model, plan, output, rebuild=loaded.rebuild, stored=stored)
    seconds += time.perf_counter() - t0
    report.written.append(str(output))
    size = output.stat().st_size
    budget = plan.limits.get("bytes")
    within = (
        "" if budget is None else f"; budget {format_bytes(budget + plan.fixed_bytes + plan.predicted.file_overhead)}"
    )
    report.line(
        f"wrote {output}: {format_bytes(size)} on disk, plan predicted {format_bytes(plan.predicted.bytes)}"
        f" ({100 * (size / plan.predicted.bytes - 1):+.2f}%){within}; {seconds:.1f}s"
    )


def _output(output: Path | None, target_format: str) -> Path:
    """The file to write: the default of the plan's format, or the one given if it is of that format."""
    gguf = target_format == "gguf"
    if output is None:
        return Path("model.allocator.gguf" if gguf else "model.allocator.safetensors")
    if gguf and output.suffix.lower() != ".gguf":
        raise AllocatorError(
            f"this plan takes llama.cpp block types (--format gguf): write it as a .gguf file, not {output}"
        )
    if not gguf and output.suffix.lower() == ".gguf":
        raise AllocatorError(
            f"this plan is of allocator's own format (int... choices), which GGUF cannot hold; solve with --format gguf"
            f" to write {output}, or write a .safetensors file"
        )
    return output


def _gguf_source(plan: Any, loaded: Any) -> Any:
    """The GGUF file a GGUF plan is written from (the one the model was read from); None for a native plan."""
    if plan.target_format != "gguf":
        return None
    if loaded.gguf is None:
        raise AllocatorError(
            f"a GGUF plan is written from the GGUF file the model was read from, and {loaded.name} is not one;"
            " convert it with llama.cpp's convert_hf_to_gguf.py (--outtype f16) and plan that .gguf"
        )
    from ..quantized.gguf_export import GgufSource

    return GgufSource(loaded.gguf, loaded.model)
