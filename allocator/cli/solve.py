"""`allocator solve`: plan bits and terms per layer within the budget, against uniform settings.

Three ways to get the profile it plans from: profile the model now (default), read a profile
file (`--profile`), or send the profile to a planning server (`--server`).
"""

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from profilers.types import ProfileTable

from ..errors import AllocatorError
from ..planning.budget import Budget
from .app import app, report
from .evaluate import check_metric_fits
from .options import (
    Budgets,
    DataOptions,
    GridOptions,
    Metric,
    Model,
    ProfileFile,
    Progress,
    SolverOptions,
    Token,
    with_options,
)
from .profile import run_profile
from .setup import Setup, check_outputs, check_profile, load_setup
from .solve_options import Forbids, MaxLoss, Pins, RefineSteps, Server, Ties, TuneSteps

__all__ = ["solve"]


def _pairs(values: list[str] | None, option: str) -> tuple[tuple[str, str], ...]:
    out = []
    for v in values or []:
        left, sep, right = v.partition("=")
        if not sep or not left or not right:
            raise AllocatorError(f"{option} takes LAYER-PATTERN=CHOICE, got {v!r} (e.g. 'classifier*=int8-ch')")
        out.append((left, right))
    return tuple(out)


@app.command()
@with_options
def solve(
    *,
    budget: Budgets = None,
    max_loss: MaxLoss = None,
    profile_file: ProfileFile = None,
    model: Model = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", metavar="PLAN.json", help="Write the plan (JSON) here.")
    ] = None,
    evaluate: Annotated[
        bool, typer.Option("--evaluate/--no-evaluate", help="Measure FP, plan and uniform settings on held-out data.")
    ] = False,
    metric: Metric = None,
    grid: GridOptions,
    pin: Pins = None,
    forbid: Forbids = None,
    tie: Ties = None,
    refine: RefineSteps = 0,
    tune: TuneSteps = 0,
    data: DataOptions,
    solver: SolverOptions,
    server: Server = None,
    token: Token = None,
    progress: Progress = True,
) -> None:
    """Plan bits and terms per layer within the budget (profiling first unless --profile), compare with uniform."""
    from ..planning.plan import Constraints

    check_outputs({"--output": output}, [profile_file, model, data.data])
    budgets = [Budget.parse(b) for b in budget or []]
    if not budgets and max_loss is None:
        raise AllocatorError("give a --budget (e.g. 12MB) or --max-loss")
    constraints = Constraints(pins=_pairs(pin, "--pin"), forbid=_pairs(forbid, "--forbid"),
                              keep=tuple(grid.keep or ()) if profile_file is not None else (),
                              device_bits=grid.device_bits, max_loss=max_loss)  # fmt: skip
    _check_combination(tie, metric, evaluate, grid.format, refine or tune, server, model)
    if server is not None:
        _solve_on_server(server, token, profile_file, budgets, constraints, solver, output)
        return
    times: dict[str, float] = {}
    setup = None
    if profile_file is not None:
        if grid.ray is not None:
            raise AllocatorError("--ray scores a new profile; with --profile nothing is profiled: drop one of them")
        table = _timed(times, "load profile", lambda: _read_profile(profile_file))
        if evaluate or model is not None or tie:
            setup = _timed(times, "load", lambda: load_setup(model or table.model_name, data))
            check_profile(table, setup.loaded, profile_file)
            check_metric_fits(setup, metric)
    else:
        choices = grid.choices()
        # Read block by block as `profile` does, unless --evaluate copies the model.
        setup = _timed(times, "load", lambda: load_setup(model, data, lazy=not evaluate))
        check_metric_fits(setup, metric)
        table, times["profile"] = run_profile(setup, grid, choices, seed=data.seed, progress=progress,
                                                score_on=data.score_on)
        report.profile(table, times["profile"])
    plan = _timed(times, "solve", lambda: _plan(table, budgets, constraints, solver, setup, tie, grid.keep))
    if refine or tune:
        plan = plan.model_copy(update={"refine_steps": refine, "tune_steps": tune})
    if output is not None:  # written before anything is printed: a closed stdout never loses it
        plan.save(output)
    _report_plan(plan, table.quantizable_params, output)
    if evaluate:
        from .evaluate import run_evaluation

        assert setup is not None
        _, times["evaluate"] = run_evaluation(setup, plan, table.fp16_bytes, progress, metric=metric)
    report.line("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))


def _check_combination(tie: list[str] | None, metric: str | None, evaluate: bool, target_format: str,
                       tuned: int, server: str | None, model: str | None) -> None:  # fmt: skip
    """Refuse, before any work, options that do not go together (and an unknown tie preset)."""
    if tie:
        from ..planning.ties import check_tie_specs

        check_tie_specs(tie)
    if metric is not None and not evaluate:
        raise AllocatorError("--metric ranks the --evaluate table; add --evaluate or drop --metric")
    if target_format == "gguf" and tuned:
        raise AllocatorError(
            "--refine and --tune tune allocator's own scales; a GGUF plan (--format gguf) takes llama.cpp's block"
            " types as rounded: drop them"
        )
    if server is not None and (evaluate or model is not None or tie or tuned):
        raise AllocatorError(
            "--evaluate, --model, --tie, --refine and --tune need the model here; drop them with --server"
        )


def _report_plan(plan: Any, quantizable: int, output: Path | None) -> None:
    report.plan(plan, quantizable)
    if plan.refine_steps:
        report.line(f"block reconstruction: {plan.refine_steps} steps per block, run by apply and evaluate"
                    " (the predicted loss is the rounding's alone)")  # fmt: skip
    if plan.tune_steps:
        report.line(f"end-to-end tuning: {plan.tune_steps} steps, run by apply and evaluate"
                    " (the predicted loss is the rounding's alone)")  # fmt: skip
    if output is not None:
        report.wrote("plan", output)


def _timed(times: dict[str, float], what: str, work: Any) -> Any:
    t0 = time.perf_counter()
    result = work()
    times[what] = time.perf_counter() - t0
    return result


def _read_profile(path: Path) -> ProfileTable:
    """A profile file; a warning when its stored validation says the estimates are poor."""
    table = ProfileTable.load(path)
    if table.validation is not None and not table.validation.trustworthy:
        report.validation(table.validation, table.profiler)
    return table


def _plan(
    table: ProfileTable,
    budgets: list[Budget],
    constraints: Any,
    solver: SolverOptions,
    setup: Setup | None,
    tie: list[str] | None,
    keep: list[str] | None,
) -> Any:
    from ..planning.build import plan_from_profile

    tie_names: list[list[str]] = []
    if tie:
        from profilers.layers import find_targets

        from ..planning.ties import profiled_ties

        assert setup is not None
        model, task = setup.loaded.model, setup.loaded.task
        targets = find_targets(model, exclude=keep or ())
        tie_names = profiled_ties(model, targets, setup.calib[0], task, table.names, tie)
    return plan_from_profile(table, budgets, ties=tie_names, constraints=constraints, solver=solver.solver,
                             gap=solver.gap, time_limit=solver.time_limit)  # fmt: skip


def _solve_on_server(
    url: str,
    token: str | None,
    profile_file: Path | None,
    budgets: list[Budget],
    constraints: Any,
    solver: SolverOptions,
    output: Path | None,
) -> None:
    from ..service.client import Client

    if profile_file is None:
        raise AllocatorError("--server plans from a profile: pass --profile PROFILE.json (made by allocator profile)")
    table = ProfileTable.load(profile_file)
    client = Client(url, token=token)
    t0 = time.perf_counter()
    profile_id = client.upload(table)
    plan = client.solve(profile_id, [b.text for b in budgets], constraints=constraints, solver=solver.solver,
                        gap=solver.gap, time_limit=solver.time_limit)  # fmt: skip
    if output is not None:
        plan.save(output)
    report.plan(plan, table.quantizable_params)
    if output is not None:
        report.wrote("plan", output)
    report.line(f"time: solve on {url} {time.perf_counter() - t0:.2f}s (profile id {profile_id[:12]})")
