"""`allocator frontier`: the optimal plan at each size of a budget sweep, against uniform settings."""

import copy
from pathlib import Path
from typing import Annotated, Any

import typer

from profilers.types import ProfileTable

from ..planning.budget import Budget
from .app import app, report
from .options import DataOptions, Model, Progress, with_options
from .setup import check_outputs, check_profile, load_setup

__all__ = ["frontier"]


@app.command()
@with_options
def frontier(
    *,
    profile_file: Annotated[
        Path, typer.Option("--profile", "-p", metavar="PROFILE.json", help="The profile to sweep (allocator profile).")
    ],
    start: Annotated[str, typer.Option("--from", metavar="BUDGET", help="Smallest budget, e.g. 2bpw or 8MB.")],
    stop: Annotated[str, typer.Option("--to", metavar="BUDGET", help="Largest budget, of the same kind.")],
    points: Annotated[int, typer.Option(min=2, help="Budgets in the sweep.")] = 40,
    output: Annotated[
        Path, typer.Option("--output", "-o", metavar="FRONTIER.csv", help="CSV of plans and uniform settings.")
    ] = Path("frontier.csv"),
    plot: Annotated[Path | None, typer.Option(metavar="PLOT.png", help="PNG plot. [default: next to the CSV]")] = None,
    evaluate: Annotated[
        bool, typer.Option("--evaluate/--no-evaluate", help="Also measure every plan on held-out data (slow).")
    ] = False,
    model: Model = None,
    data: DataOptions,
    solver: Annotated[str, typer.Option(help="auto, greedy, cpsat, milp, lp or exhaustive.")] = "auto",
    progress: Progress = True,
) -> None:
    """Sweep the budget: the optimal plan at each size, against every uniform setting (CSV + PNG)."""
    from ..measure.plots import plot_frontier
    from ..planning.frontier import budget_sweep, sweep, write_csv

    png = plot or output.with_suffix(".png")
    check_outputs({"--output": output, "--plot": png}, [profile_file, model, data.data])
    table = ProfileTable.load(profile_file)
    budgets = budget_sweep(Budget.parse(start), Budget.parse(stop), points)
    skipped: list = []
    with report.progress(progress) as update:
        result = sweep(table, budgets, solver=solver, progress=update, skipped=skipped)
    if evaluate:
        _measure(result, table, profile_file, model, data, progress)
    write_csv(result, table, output)
    plot_frontier(result, table, png)
    best = ", ".join(f"{p.budget}: {p.plan.predicted.loss:.4g}" for p in result[:: max(1, len(result) // 5)])
    report.line(f"{len(result)} plans from {result[0].budget} to {result[-1].budget} (predicted loss {best})")
    report.wrote("frontier", output)
    report.wrote("plot", png)
    if skipped:
        report.warn(f"{len(skipped)} of {len(budgets)} budgets admit no plan and were left out"
                    f" ({', '.join(s.budget for s in skipped[:3])}{', ...' if len(skipped) > 3 else ''}):"
                    f" {skipped[0].reason}")  # fmt: skip


def _measure(result: list[Any], table: ProfileTable, profile_file: Path, model: str | None, data: DataOptions,
             progress: bool) -> None:  # fmt: skip
    """Fill every point's measured loss: the plan applied, its divergence on held-out data."""
    from ..measure.metrics import each_output, model_outputs
    from ..quantized.apply import apply_plan_, plan_hessians

    setup = load_setup(model or table.model_name, data)
    check_profile(table, setup.loaded, profile_file)
    loaded, evals = setup.loaded, setup.data.evals
    reference = model_outputs(loaded.model, evals, loaded.task)
    first = result[0].plan  # sequential plans take their own H per point, on their own quantized blocks
    hessians = None if first.sequential else plan_hessians(loaded.model, first, None, setup.calib, loaded.task)
    with report.progress(progress) as update:
        for k, point in enumerate(result):
            update("measuring", k, len(result))
            quantized = apply_plan_(copy.deepcopy(loaded.model), point.plan, hessians=hessians, calibration=setup.calib,
                                    task=loaded.task)  # fmt: skip
            outs = each_output(quantized, evals, loaded.task)  # one batch's logits at a time
            div = [loaded.task.divergence(r, o, b).mean() for r, o, b in zip(reference, outs, evals, strict=True)]
            point.measured_loss = float(sum(float(d) for d in div) / len(div))
