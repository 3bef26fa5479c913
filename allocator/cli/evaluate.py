"""`allocator evaluate`: the plan against FP, the best uniform settings and other quantizers."""

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from profilers.quant.options import needs_hessian

from .app import app, report
from .options import Metric, PlanArg, PlanModel, PlanModelArg, Progress, RecordedDataOptions, with_options
from .setup import Setup, check_outputs, check_weights, load_setup, model_and_plan

__all__ = ["check_metric_fits", "evaluate", "run_evaluation"]


def check_metric_fits(setup: Setup, metric: str | None) -> None:
    """Refuse, right after loading, a --metric this model and data cannot give."""
    from ..measure.metrics import check_metric, metrics_for

    loaded = setup.loaded
    words = loaded.task.output == "embedding" and loaded.tokenizer is not None
    check_metric(metric, metrics_for(loaded.task, setup.data.evals, words=words))


def run_evaluation(
    setup: Setup,
    plan: Any,
    fp16_bytes: int,
    progress: bool,
    *,
    metric: str | None = None,
    peers: tuple[str, ...] = (),
    top_uniform: int = 3,
) -> tuple[Any, float]:
    """Measure FP, the plan, uniform settings and peers on the held-out data; print the table."""
    from ..measure.evaluate import compare, default_uniform, unrefined_label
    from ..measure.metrics import wordsim_spearman
    from ..measure.peers import peer_variants
    from ..quantized.apply import layer_hessians
    from ..sources.data import other_domain_batches
    from ..sources.text import wordsim353

    started = time.perf_counter()
    loaded = setup.loaded
    words = None
    if loaded.task.output == "embedding" and loaded.tokenizer is not None:
        pairs = wordsim353()
        words = lambda m: wordsim_spearman(m, loaded.tokenizer, loaded.task, pairs)  # noqa: E731
    check_metric_fits(setup, metric)
    other, other_name = None, None
    if loaded.kind == "causal-lm" and setup.data.unit == "windows":  # and text of another domain, side by side
        assert setup.data.max_length is not None
        other, other_name = other_domain_batches(loaded, window=setup.data.max_length,
                                                 batch_size=setup.data.batch_size)  # fmt: skip
    uniform = default_uniform(plan, top=top_uniform)
    variants, skipped = peer_variants(peers, loaded.model, plan, setup.calib, loaded.task)
    bare = [label] if (label := unrefined_label(plan)) else []
    labels = ["FP", "plan", *bare, *(f"uniform {u.choice.label}" for u in uniform), *(v.label for v in variants)]
    with report.progress(progress) as update:
        # Every H at once, shared by the variants; a sequential plan's variants take their own.
        shared = needs_hessian(plan.method) and not plan.sequential
        hessians = layer_hessians(loaded.model, setup.calib, loaded.task) if shared else None
        cmp = compare(loaded.model, plan, setup.data.evals, loaded.task, uniform=uniform, words=words,
                      fp_bytes=fp16_bytes, progress=lambda label: update("measuring", labels.index(label), len(labels)),
                      hessians=hessians, calibration=setup.calib, peers=variants, skipped=skipped,
                      metric=metric, block_progress=update, other=other)  # fmt: skip
    if cmp.refined:
        report.refinement(cmp.refined, plan.refine_steps)
    if cmp.tuned is not None:
        report.tuning(cmp.tuned)
    report.comparison(cmp, f"{setup.data.n_eval} held-out {setup.data.unit}", fp16_bytes, plan, other=other_name)
    return cmp, time.perf_counter() - started


@app.command()
@with_options
def evaluate(
    model: PlanModelArg = None,
    plan_file: PlanArg = None,
    *,
    model_option: PlanModel = None,
    data: RecordedDataOptions,
    metric: Metric = None,
    peers: Annotated[
        str,
        typer.Option(help="Other quantizers at the plan's size, comma-separated: minmax (plain round-to-nearest),"
                     " hqq, modelopt, or none."),
    ] = "minmax,hqq,modelopt",
    uniform: Annotated[int, typer.Option(min=0, help="Fitting uniform settings to measure, best predicted first.")] = 3,
    json_out: Annotated[bool, typer.Option("--json", help="Print the table as JSON (for machines) instead.")] = False,
    plot: Annotated[Path | None, typer.Option(metavar="PLOT.png", help="Also draw the comparison as a PNG.")] = None,
    progress: Progress = True,
) -> None:
    """Measure the plan against FP, the best uniform settings and other quantizers at the same size (a plan made
    with --refine or --tune also without them)."""
    from profilers.layers import fp16_bytes

    from ..planning.plan import Plan

    model, plan_path = model_and_plan(model, plan_file, model_option)
    check_outputs({"--plot": plot}, [plan_path, model, data.data])
    plan = Plan.load(plan_path)
    peer_names = tuple(p.strip().lower() for p in peers.split(",") if p.strip() and p.strip().lower() != "none")
    saved_out = report.out
    if json_out:
        report.out = report.err  # the JSON alone goes to stdout
    try:
        t0 = time.perf_counter()
        setup = load_setup(model or plan.model_name or None, data.resolve(plan.data))
        check_weights(plan.model_fingerprint, setup.loaded, plan_path, "solve again for this model")
        loading = time.perf_counter() - t0
        if needs_hessian(plan.method) and plan.data is None and data.data is None:
            report.warn("the plan does not record its calibration data; GPTQ rounding uses the default split")
        cmp, seconds = run_evaluation(setup, plan, fp16_bytes(setup.loaded.model), progress, metric=metric,
                                      peers=peer_names, top_uniform=uniform)  # fmt: skip
        if plot is not None:
            from ..measure.plots import plot_comparison

            plot_comparison(cmp, plot, title=f"{setup.loaded.name}: plan at {plan.predicted.bpw:.2f} bpw, measured")
            report.wrote("plot", plot)
        report.line(f"time: load {loading:.1f}s, evaluate {seconds:.1f}s")
    finally:
        report.out = saved_out
    if json_out:
        sys.stdout.write(json.dumps(_as_json(cmp, setup, plan_path), indent=1) + "\n")


def _as_json(cmp: Any, setup: Setup, plan_path: Path) -> dict[str, Any]:
    best_u, best_p = cmp.best_uniform(fitting_only=True), cmp.best_peer()
    return {
        "model": setup.loaded.name,
        "plan": str(plan_path),
        "metric": cmp.metric,
        "held_out": {"items": setup.data.n_eval, "unit": setup.data.unit, "source": setup.data.source},
        "other_text": None if cmp.fp.elsewhere is None else "Wikipedia articles (gensim's enwiki test dump)",
        "rows": [asdict(m) for m in cmp.rows],
        "best_uniform": best_u.label if best_u else None,
        "best_peer": best_p.label if best_p else None,
        "plan_beats_best_uniform": None if best_u is None else cmp.score(cmp.plan) > cmp.score(best_u),
        "plan_beats_best_peer": None if best_p is None else cmp.score(cmp.plan) > cmp.score(best_p),
        "skipped": cmp.skipped,
        "plan_loss_on_calibration": cmp.plan_on_calibration,
        "refined_blocks": [asdict(r) for r in cmp.refined],
        "tuning": None if cmp.tuned is None else asdict(cmp.tuned),
    }
