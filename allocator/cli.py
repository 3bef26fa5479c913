"""Command line: `allocator solve --budget 12MB [--evaluate] [-o plan.json]`.

Errors a user can fix print one line (`error: ...`) and exit with status 2; nothing the user
had is overwritten unless the command finished.
"""

from __future__ import annotations

import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from profilers.specs import ProfileTable

from . import __version__
from .budget import Budget, format_bytes
from .errors import USER_ERRORS, AllocatorError
from .evaluate import Comparison
from .plan import Plan

app = typer.Typer(
    name="allocator",
    help="Budgeted mixed-precision, multi-term post-training quantization for PyTorch models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
console = Console()
if not console.is_terminal:  # piped or captured: keep table rows on one line
    console = Console(width=140)
err_console = Console(stderr=True)


def _parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AllocatorError(f"--{what} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise AllocatorError(f"--{what} is empty")
    return values


def _parse_groups(text: str) -> list[int | None]:
    out: list[int | None] = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        if part in ("channel", "ch", "row"):
            out.append(None)
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        else:
            raise AllocatorError(f"--group-size takes positive integers or 'channel', got {part!r}")
    if not out:
        raise AllocatorError("--group-size is empty")
    return out


@contextmanager
def _progress(enabled: bool):
    """A rich progress display fed by `(stage, done, total)` callbacks."""
    if not enabled:
        yield lambda stage, done, total: None
        return
    columns = (TextColumn("{task.description:>12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def _plan_tables(plan: Plan, profile: ProfileTable) -> None:
    by_choice = Table(title="Plan by choice", title_justify="left")
    for col in ("choice", "layers", "weights", "bytes", "share"):
        by_choice.add_column(col, justify="left" if col == "choice" else "right")
    total_q = plan.predicted.quantized_bytes
    for label, (layers, weights, size) in plan.choice_summary().items():
        by_choice.add_row(label, str(layers), f"{weights:,}", format_bytes(size), f"{100 * size / total_q:.1f}%")
    console.print(by_choice)

    budget = ", ".join(b.text for b in plan.budgets)
    limit = plan.limits.get("bytes")
    lines = [
        f"budget        {budget}"
        + (f"  (≤ {format_bytes(limit + plan.fixed_bytes)} whole model)" if limit is not None else ""),
        f"predicted     {format_bytes(plan.predicted.bytes)} whole model"
        f" = {format_bytes(plan.predicted.quantized_bytes)}"
        f" planned weights ({plan.predicted.bpw:.3f} bpw on {profile.quantizable_params:,} weights)"
        f" + {format_bytes(plan.fixed_bytes)} kept fp16",
        f"loss          {plan.predicted.loss:.5f}  [{plan.loss_units}]",
        f"solver        {plan.solver.backend}: {plan.solver.status}, proven gap {plan.solver.gap:.1e}"
        f" (lower bound {plan.solver.lower_bound:.5f})",
    ]
    console.print("\n".join(lines), highlight=False)

    uni = Table(title="Uniform settings at this budget (predicted, best first)", title_justify="left")
    for col in ("setting", "size", "bpw", "predicted loss", "fits"):
        uni.add_column(col, justify="left" if col == "setting" else "right")
    fitting = [u for u in plan.uniform if u.fits][:5]
    over = [u for u in plan.uniform if not u.fits and u.bytes >= plan.predicted.bytes]
    shown = fitting + sorted(over, key=lambda u: u.bytes)[:2]
    for u in shown:
        uni.add_row(u.choice.label, format_bytes(u.bytes), f"{u.bpw:.3f}", f"{u.loss:.5f}", "yes" if u.fits else "no")
    console.print(uni)
    best = plan.best_uniform()
    if best is None:
        console.print("no uniform setting fits this budget; the plan is the only way to meet it")
    else:
        ratio = best.loss / plan.predicted.loss if plan.predicted.loss > 0 else float("inf")
        console.print(
            f"best uniform that fits: {best.choice.label} ({format_bytes(best.bytes)}), predicted loss "
            f"{best.loss:.5f} = {ratio:.2f}x the plan's",
            highlight=False,
        )


def _comparison_table(cmp: Comparison, n_docs: int, fp_size: int) -> None:
    table = Table(title=f"Measured on {n_docs} held-out documents", title_justify="left")
    embedding = cmp.metric == "cosine"
    cols = ["model", "size", "bpw", "predicted loss", "measured loss"]
    cols += ["cosine to FP", "WordSim353 ρ"] if embedding else ["top-1 agreement"]
    cols.append("time")
    for col in cols:
        table.add_column(col, justify="left" if col == "model" else "right")
    for m in cmp.rows:
        size = format_bytes(fp_size) + " fp16" if m is cmp.fp else format_bytes(m.bytes)
        row = [
            m.label,
            size,
            "16" if m is cmp.fp else f"{m.bpw:.3f}",
            "-" if m.predicted_loss is None else f"{m.predicted_loss:.5f}",
            f"{m.divergence:.5f}",
        ]
        if embedding:
            row += [f"{m.cosine:.4f}", "-" if m.wordsim is None else f"{m.wordsim:.4f}"]
        else:
            row += [f"{m.agreement:.4f}"]
        row.append(f"{m.seconds:.1f}s")
        table.add_row(*row)
    console.print(table)
    best_fit = cmp.best_uniform(fitting_only=True)
    if best_fit is not None:
        delta = cmp.score(cmp.plan) - cmp.score(best_fit)
        verdict = "beats" if delta > 0 else "does not beat"
        console.print(
            f"plan {verdict} the best measured uniform setting that fits ({best_fit.label}): "
            f"{cmp.metric} {cmp.score(cmp.plan):.4f} vs {cmp.score(best_fit):.4f} ({delta:+.4f})",
            highlight=False,
        )


@app.command()
def solve(
    budget: Annotated[
        list[str],
        typer.Option(
            "--budget",
            "-b",
            metavar="BUDGET",
            help="Budget: 12MB / 300MiB / 0.3GB (whole model), 3.5bpw, 25% (of fp16 size), 40GBOPs. Repeatable.",
        ),
    ],
    model: Annotated[
        str,
        typer.Option("--model", "-m", metavar="NAME|PATH", help="'minilm' (built in) or a Hugging Face model folder."),
    ] = "minilm",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", metavar="PLAN.json", help="Write the plan (JSON) here.")
    ] = None,
    evaluate: Annotated[
        bool,
        typer.Option("--evaluate/--no-evaluate", help="Measure FP, plan and uniform settings on held-out text."),
    ] = False,
    bits: Annotated[str, typer.Option(help="Bit widths to consider, comma-separated (2-8).")] = "2,3,4,5,6,8",
    terms: Annotated[str, typer.Option(help="Residual term counts to consider (bits x terms <= 8).")] = "1,2",
    group_size: Annotated[
        str, typer.Option("--group-size", help="Group sizes along a row, or 'channel' (one group per row).")
    ] = "64,128,channel",
    keep: Annotated[
        list[str] | None,
        typer.Option(metavar="PATTERN", help="Layer-name pattern to keep in fp16 (fnmatch). Repeatable."),
    ] = None,
    tie: Annotated[
        list[str] | None,
        typer.Option(
            metavar="TIE",
            help="Layers that must share one choice: 'qkv', 'gate_up', or patterns joined by '|'. Repeatable.",
        ),
    ] = None,
    calibration: Annotated[int, typer.Option(help="Calibration documents (the rest are for --evaluate).")] = 64,
    max_length: Annotated[int, typer.Option(help="Tokens per document.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Documents per batch.")] = 16,
    draws: Annotated[int, typer.Option(help="Pseudo-label draws per batch for the Fisher score.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the calibration split and pseudo-labels.")] = 0,
    solver: Annotated[str, typer.Option(help="auto, greedy, cpsat or exhaustive.")] = "auto",
    gap: Annotated[float, typer.Option(help="Relative optimality gap accepted without an exact solve.")] = 1e-6,
    time_limit: Annotated[float, typer.Option(help="Seconds for an exact solve.")] = 10.0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    """Profile a model, plan bits and terms per layer within the budget, compare with uniform."""
    from . import api, models
    from .evaluate import compare, default_uniform, wordsim_spearman
    from .planning import plan_from_profile

    budgets = [Budget.parse(b) for b in budget]
    choices = api.choice_grid(_parse_ints(bits, "bits"), _parse_ints(terms, "terms"), _parse_groups(group_size))
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    loaded = models.load_model(model)
    docs = models.lee_documents()
    calib_docs, eval_docs = models.split_documents(docs, calibration, seed=seed)
    calib = models.text_batches(loaded.tokenizer, calib_docs, max_length=max_length, batch_size=batch_size)
    times["load"] = time.perf_counter() - t0
    console.print(
        f"model {loaded.name} ({loaded.kind}); calibration: {len(calib_docs)} documents of lee_background.cor, "
        f"{max_length} tokens; {len(choices)} choices per layer",
        highlight=False,
    )

    t0 = time.perf_counter()
    with _progress(progress) as report:
        table = api.profile(
            loaded.model,
            calib,
            task=loaded.task,
            choices=choices,
            exclude=keep or (),
            draws=draws,
            seed=seed,
            model_name=loaded.name,
            progress=report,
        )
    times["profile"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tie_names: list[list[str]] = []
    if tie:
        from profilers.layers import find_targets

        from .graph import build_graph, tie_groups

        targets = find_targets(loaded.model, exclude=keep or ())
        graph = build_graph(loaded.model, targets, calib[0], task=loaded.task)
        profiled = set(table.names)
        tie_names = [[n for n in g if n in profiled] for g in tie_groups(graph, tie)]
    plan = plan_from_profile(table, budgets, ties=tie_names, method=solver, gap=gap, time_limit=time_limit)
    times["solve"] = time.perf_counter() - t0
    _plan_tables(plan, table)

    if output is not None:
        plan.save(output)
        console.print(f"plan written to {output}", highlight=False)

    if evaluate:
        t0 = time.perf_counter()
        evals = models.text_batches(loaded.tokenizer, eval_docs, max_length=max_length, batch_size=batch_size)
        words = None
        if loaded.task.output == "embedding" and loaded.tokenizer is not None:
            pairs = models.wordsim353()
            words = lambda m: wordsim_spearman(m, loaded.tokenizer, loaded.task, pairs)  # noqa: E731
        uniform = default_uniform(plan)
        with _progress(progress) as report:
            labels = ["FP", "plan", *(f"uniform {u.choice.label}" for u in uniform)]
            note = lambda label: report("measuring", labels.index(label), len(labels))  # noqa: E731
            cmp = compare(
                loaded.model,
                plan,
                evals,
                loaded.task,
                uniform=uniform,
                words=words,
                fp_bytes=table.fp16_bytes,
                progress=note,
            )
        times["evaluate"] = time.perf_counter() - t0
        _comparison_table(cmp, len(eval_docs), table.fp16_bytes)
    console.print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()), highlight=False)


@app.command()
def version() -> None:
    """Print the version."""
    console.print(__version__)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `allocator` command; returns the exit status."""
    warnings.showwarning = _show_warning
    try:
        app(args=argv, prog_name="allocator")
    except USER_ERRORS as e:
        err_console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
