"""`allocator profile`: estimate the cost and sensitivity of every (layer, option) once."""

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from profilers.quant.options import DEFAULT_METHOD, DEFAULT_ROTATION, LLM_METHOD, with_rotation
from profilers.types import ProfileTable

from .app import app, report
from .options import DataOptions, GridOptions, Model, ModelArg, Progress, with_options
from .setup import Setup, check_outputs, load_setup, one_model

__all__ = ["cluster_summary", "profile", "run_profile"]


def run_profile(
    setup: Setup,
    grid: GridOptions,
    choices: tuple[list, dict],
    *,
    seed: int,
    progress: bool,
    score_on: int | None = None,
) -> tuple[ProfileTable, float]:
    """Profile the loaded model on its calibration data with `choices` (`grid.choices()`),
    scoring on `score_on` items of it (`DataOptions.score_on`); the table records the data split."""
    from .. import api
    from ..sources import LLM_SCORED

    choices, limits = choices
    llm = setup.loaded.kind == "causal-lm"
    score_on = score_on or (LLM_SCORED if llm else None)
    scored = None if score_on is None else -(-score_on // setup.data.batch_size)
    choices = with_rotation(choices, grid.rotation or DEFAULT_ROTATION)
    started = time.perf_counter()
    with report.progress(progress) as update, cluster_summary(grid.ray is not None):
        table = api.profile(
            setup.loaded.model,
            setup.calib,
            task=setup.loaded.task,
            profiler=grid.profiler,
            choices=choices,
            fractions=grid.fractions,
            exclude=grid.keep or setup.loaded.keep,
            draws=grid.draws,
            max_memory=grid.max_memory,
            seed=seed,
            model_name=setup.loaded.name,
            progress=update,
            method=grid.method or (LLM_METHOD if llm else DEFAULT_METHOD),
            sequential=grid.sequential,
            scored=scored,
            target_format=grid.format,
            gguf_source=setup.loaded.gguf,
            ray=grid.ray,
            **limits,
        )
    table = table.model_copy(update={"data": setup.data.split()})
    return table, time.perf_counter() - started


@contextmanager
def cluster_summary(on: bool) -> Iterator[None]:
    """With --ray, the cluster's summary (tasks, bytes moved, seconds per task) printed when its tasks are gathered."""
    if not on:
        yield
        return
    log = logging.getLogger("profilers.cluster")
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: report.line(record.getMessage())  # type: ignore[method-assign]
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


@app.command()
@with_options
def profile(
    model: ModelArg = None,
    *,
    model_option: Model = None,
    output: Annotated[
        Path, typer.Option("--output", "-o", metavar="PROFILE.json", help="Write the profile (JSON) here.")
    ] = Path("profile.json"),
    data: DataOptions,
    grid: GridOptions,
    validate: Annotated[
        bool,
        typer.Option(
            "--validate/--no-validate", help="Compare the estimates with measured divergence and store the result."
        ),
    ] = False,
    validate_pairs: Annotated[int, typer.Option(min=1, help="(layer, option) pairs measured by --validate.")] = 64,
    validate_plans: Annotated[int, typer.Option(min=1, help="Random whole-model plans measured by --validate.")] = 20,
    progress: Progress = True,
) -> None:
    """Estimate cost and sensitivity of every (layer, option) once; solve any budget from the file."""
    model = one_model(model, model_option)
    check_outputs({"--output": output}, [model, data.data])
    choices = grid.choices()
    setup = load_setup(model, data, lazy=not validate)  # --validate copies weights of every block at once
    table, seconds = run_profile(setup, grid, choices, seed=data.seed, progress=progress, score_on=data.score_on)
    report.profile(table, seconds)
    if validate:
        from ..measure.validation import validate_profile

        with report.progress(progress) as update:
            v = validate_profile(setup.loaded.model, setup.calib, table, setup.loaded.task, pairs=validate_pairs,
                                 plans=validate_plans, seed=data.seed, progress=update)  # fmt: skip
        table = table.model_copy(update={"validation": v})
        report.validation(v, table.profiler)
    table.save(output)
    report.wrote("profile", output)
