"""What the CLI prints: plan, uniform settings, measured comparison, profile summary.

Rendering only: every number comes from a `Plan`, `ProfileTable` or `Comparison`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from profilers.types import ProfileTable, Validation

from ..planning.budget import format_bytes
from ..planning.plan import Plan
from ..progress import progress_bars

if TYPE_CHECKING:
    from ..measure.evaluate import Comparison
    from ..measure.metrics import Measured

__all__ = ["Reporter"]

# (metric name, column title, formatter), in the order the table shows them
_METRIC_COLUMNS = (
    ("cosine", "cosine to FP", lambda v: f"{v:.4f}"),
    ("wordsim", "WordSim353 ρ", lambda v: f"{v:.4f}"),
    ("perplexity", "perplexity", lambda v: f"{v:.3f}"),
    ("accuracy", "accuracy", lambda v: f"{100 * v:.2f}%"),
    ("agreement", "top-1 agreement", lambda v: f"{v:.4f}"),
)


def _versus(cmp: Comparison, a: Measured, b: Measured) -> str:
    """`metric a vs b (difference)`, in the metric's own sign (lower is better for perplexity, kl)."""
    va, vb = a.value(cmp.metric), b.value(cmp.metric)
    if va is None or vb is None:
        va, vb, name = a.divergence, b.divergence, "measured loss"
    else:
        name = cmp.metric
    return f"{name} {va:.4f} vs {vb:.4f} ({va - vb:+.4f})"


def _elsewhere(cmp: Comparison, a: Measured, b: Measured) -> str:
    """`; other text: metric a vs b (difference)` when both were measured on text of another domain."""
    if a.elsewhere is None or b.elsewhere is None:
        return ""
    return f"; other text: {_versus(cmp, a.elsewhere, b.elsewhere)}"


def _against(value: float, predicted: float) -> str:
    """A measured loss and its ratio to the predicted one: `0.00395 (1.00x)`."""
    return f"{_loss(value)} ({value / predicted:.2f}x)"


def _loss(value: float) -> str:
    """A loss with five decimals, or three significant digits when it is smaller than that shows."""
    return f"{value:.5f}" if value == 0 or value >= 1e-3 else f"{value:.3g}"


class Reporter:
    """Prints tables to `out` and progress/warnings to `err`."""

    def __init__(self, out: Console, err: Console) -> None:
        self.out = out
        self.err = err
        self.written: list[str] = []  # files this command wrote, in order

    def line(self, text: str) -> None:
        self.out.print(text, highlight=False, soft_wrap=True)

    def wrote(self, what: str, path: object) -> None:
        """Record and say that `what` was written to `path` (after it was, atomically)."""
        self.written.append(str(path))
        self.line(f"{what} written to {path}")

    def warn(self, text: str) -> None:
        self.err.print(f"[yellow]warning:[/] {text}", highlight=False, soft_wrap=True)

    def refinement(self, refined: Sequence[Any], steps: int) -> None:
        """One line on a block reconstruction (`refine.BlockRefinement` per block)."""
        seconds = sum(r.seconds for r in refined)
        kept = [r for r in refined if r.kept]
        fell = sum(1 - r.loss_after / r.loss_before for r in kept if r.loss_before > 0) / max(len(kept), 1)
        self.line(
            f"block reconstruction: {len(refined)} blocks x {steps} steps in {seconds:.0f}s"
            f" ({seconds / max(len(refined), 1):.1f}s per block); {len(kept)} kept their tuned terms,"
            f" their output error fell {100 * fell:.1f}% on average"
        )

    def tuning(self, tuned: Any) -> None:
        """One line on an end-to-end tuning (`tune.Tuning`)."""
        change = 100 * (tuned.loss_after / tuned.loss_before - 1) if tuned.loss_before > 0 else 0.0
        outcome = "kept" if tuned.kept else "not kept: it did not lower it"
        self.line(
            f"end-to-end tuning: {tuned.steps} steps on {tuned.parameters:,} scales and offsets of {tuned.layers}"
            f" layers in {tuned.seconds:.0f}s ({tuned.seconds / max(tuned.steps, 1):.1f}s per step); divergence"
            f" on the calibration data {_loss(tuned.loss_before)} -> {_loss(tuned.loss_after)} ({change:+.1f}%),"
            f" {outcome}"
        )

    @contextmanager
    def progress(self, enabled: bool) -> Iterator[Callable[[str, int, int], None]]:
        """Progress bars with an ETA fed by `(stage, done, total)` callbacks (a no-op when disabled)."""
        with progress_bars(self.err, enabled) as update:
            yield update

    def profile(self, table: ProfileTable, seconds: float) -> None:
        counts = sorted({len(layer.options) for layer in table.layers})
        n_options = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        fractions = sum(1 for o in table.layers[0].options if o.choice.extra)
        rest = "copied from the source GGUF" if table.settings.get("format") == "gguf" else "kept fp16"
        self.line(
            f"profile: {table.profiler} estimates for {len(table.layers)} layers x {n_options} options"
            f" ({fractions} fractional) from {table.settings.get('samples')} samples{_scored(table)} in {seconds:.1f}s;"
            f" {table.quantizable_params:,} quantizable weights, {format_bytes(table.fixed_bytes)} {rest}"
        )
        if table.kept_fp16:
            self.line(f"never ran during calibration (kept fp16): {', '.join(table.kept_fp16)}")

    def validation(self, v: Validation, profiler: str) -> None:
        self.line(
            f"validation of {profiler} against measurement: Spearman {v.spearman:.3f} over {v.pairs} (layer, option)"
            f" pairs{f' on {v.batches} batches' if v.batches else ''}; additivity over {v.plans} random plans:"
            f" Pearson {v.additivity_pearson:.3f},"
            f" measured/estimated {v.additivity_ratio:.2f} ({v.seconds:.0f}s)"
        )
        if not v.trustworthy:
            self.warn(
                f"the {profiler} estimates agree poorly with measurement; plans may be off "
                "(profile with more --draws or --profiler measured)"
            )

    def plan(self, plan: Plan, profile_params: int) -> None:
        """The plan by choice, its budget, prediction and solver, and the uniform settings it beats."""
        self._choices(plan)
        self._summary(plan, profile_params)
        self._uniform(plan)
        self._uniform_verdict(plan)

    def _choices(self, plan: Plan) -> None:
        by_choice = Table(title="Plan by choice", title_justify="left")
        for col in ("choice", "layers", "weights", "bytes", "share"):
            by_choice.add_column(col, justify="left" if col == "choice" else "right")
        total_q = plan.predicted.quantized_bytes
        for label, (layers, weights, size) in plan.choice_summary().items():
            by_choice.add_row(label, str(layers), f"{weights:,}", format_bytes(size), f"{100 * size / total_q:.1f}%")
        self.out.print(by_choice)

    def _summary(self, plan: Plan, profile_params: int) -> None:
        budget = ", ".join(b.text for b in plan.budgets) or "none"
        limit = plan.limits.get("bytes")
        whole = f"  (≤ {format_bytes(limit + plan.fixed_bytes)} whole model)" if limit is not None else ""
        self.line(f"budget        {budget}{whole}")
        c = plan.constraints
        if c.max_loss is not None:
            self.line(f"question      the smallest plan with predicted loss ≤ {c.max_loss:g}")
        rules = [f"pin {p}={x}" for p, x in c.pins] + [f"forbid {p}={x}" for p, x in c.forbid]
        rules += [f"keep {p}" for p in c.keep] + ([f"device bits {c.device_bits}"] if c.device_bits else [])
        if rules:
            self.line(f"constraints   {'; '.join(rules)}")
        self.line(
            f"predicted     {format_bytes(plan.predicted.bytes)} whole model"
            f" = {format_bytes(plan.predicted.quantized_bytes)} planned weights"
            f" ({plan.predicted.bpw:.3f} bpw on {profile_params:,} weights)"
            + (f" + {format_bytes(plan.fixed_bytes)} copied from the source GGUF"
               f" + {format_bytes(plan.predicted.file_overhead)} GGUF header"
               if plan.target_format == "gguf" else
               f" + {format_bytes(plan.fixed_bytes)} kept fp16"
               + (f" + {format_bytes(plan.predicted.file_overhead)} file header allowance"
                  if plan.predicted.file_overhead else ""))
        )
        self.line(f"loss          {_loss(plan.predicted.loss)}  [{plan.loss_units}]")
        bound = (
            format_bytes(plan.solver.lower_bound)
            if plan.solver.objective_is == "bytes"
            else f"{_loss(plan.solver.lower_bound)}"
        )
        self.line(
            f"solver        {plan.solver.backend}: {plan.solver.status}, proven gap {plan.solver.gap:.1e}"
            f" (lower bound {bound})"
        )

    def _uniform(self, plan: Plan) -> None:
        if plan.constraints.max_loss is not None:
            eps = plan.constraints.max_loss
            title = f"Uniform settings with predicted loss ≤ {eps:g} (smallest first), and the closest that miss it"
            shown = sorted((u for u in plan.uniform if u.fits and u.loss <= eps), key=lambda u: u.bytes)[:5]
            shown += sorted((u for u in plan.uniform if u.loss > eps), key=lambda u: u.loss)[:2]
        else:
            title = "Uniform settings at this budget (predicted, best first)"
            over = (u for u in plan.uniform if not u.fits and u.bytes >= plan.predicted.bytes)
            shown = [u for u in plan.uniform if u.fits][:5] + sorted(over, key=lambda u: u.bytes)[:2]
        uni = Table(title=title, title_justify="left")
        for col in ("setting", "size", "bpw", "predicted loss", "fits"):
            uni.add_column(col, justify="left" if col == "setting" else "right")
        for u in shown:
            uni.add_row(
                u.choice.label, format_bytes(u.bytes), f"{u.bpw:.3f}", f"{_loss(u.loss)}", "yes" if u.fits else "no"
            )
        self.out.print(uni)

    def _uniform_verdict(self, plan: Plan) -> None:
        best = plan.best_uniform()
        if plan.constraints.max_loss is not None:
            if best is None:
                self.line(f"no uniform setting reaches predicted loss ≤ {plan.constraints.max_loss:g}")
            else:
                self.line(
                    f"smallest uniform setting with predicted loss ≤ {plan.constraints.max_loss:g}: {best.choice.label}"
                    f" ({format_bytes(best.bytes)}) = {best.bytes / plan.predicted.bytes:.2f}x the plan's size"
                )
        elif best is None:
            self.line("no uniform setting fits this budget; the plan is the only way to meet it")
        else:
            ratio = best.loss / plan.predicted.loss if plan.predicted.loss > 0 else float("inf")
            self.line(
                f"best uniform that fits: {best.choice.label} ({format_bytes(best.bytes)}), predicted loss "
                f"{_loss(best.loss)} = {ratio:.2f}x the plan's"
            )

    def comparison(
        self, cmp: Comparison, held_out: str, fp_size: int, plan: Plan | None = None, other: str | None = None
    ) -> None:
        """The measured table (with `other`, every row measured on text of another domain too)."""
        title = f"Measured on {held_out}" + (f"; other text: {other}" if other else "")
        table = Table(title=title, title_justify="left")
        shown = [(name, title, fmt) for name, title, fmt in _METRIC_COLUMNS if cmp.fp.value(name) is not None]
        elsewhere = cmp.fp.elsewhere is not None
        cols = ["model", "size", "bpw", "predicted loss", "measured loss", *(t for _, t, _ in shown)]
        cols += [f"{t}, other text" for t in ("measured loss", *(t for _, t, _ in shown))] if elsewhere else []
        cols.append("time")
        for col in cols:
            table.add_column(col, justify="left" if col == "model" else "right")
        for m in cmp.rows:
            size = format_bytes(fp_size) + " fp16" if m is cmp.fp else format_bytes(m.bytes)
            row = [
                m.label + ("" if m.fits else " (over budget)"),
                size,
                "16" if m is cmp.fp else f"{m.bpw:.3f}",
                "-" if m.predicted_loss is None else f"{_loss(m.predicted_loss)}",
                f"{_loss(m.divergence)}",
            ]
            row += ["-" if m.value(name) is None else fmt(m.value(name)) for name, _, fmt in shown]
            if elsewhere:
                e = m.elsewhere
                row += ["-"] * (1 + len(shown)) if e is None else [_loss(e.divergence)] + [
                    "-" if e.value(name) is None else fmt(e.value(name)) for name, _, fmt in shown
                ]
            made = f"{m.quantize_seconds:.1f}+" if m.quantize_seconds >= 0.05 else ""
            row.append(f"{made}{m.seconds:.1f}s")
            table.add_row(*row)
        self.out.print(table)
        if any(m.quantize_seconds >= 0.05 for m in cmp.rows):
            self.line("time: seconds to make the variant + seconds to measure it")
        for reason in cmp.skipped:
            self.line(f"peer skipped: {reason}")
        if cmp.plan_on_calibration is not None and cmp.plan.predicted_loss:
            predicted = cmp.plan.predicted_loss
            checked = cmp.unrefined or cmp.plan  # the prediction is the rounding's, without --refine/--tune
            without = cmp.unrefined.label.removeprefix("plan") if cmp.unrefined else ""
            other = checked.elsewhere
            self.line(
                f"estimate check: the plan's predicted loss {_loss(predicted)}; measured"
                f"{without} on the calibration data it was scored on {_against(cmp.plan_on_calibration, predicted)},"
                f" held out {_against(checked.divergence, predicted)}"
                + ("" if other is None else f", other text {_against(other.divergence, predicted)}")
            )
        if plan is not None and plan.constraints.max_loss is not None:
            target = plan.best_uniform()
            rows = [m for m in cmp.uniform if target is not None and m.label == f"uniform {target.choice.label}"]
            if rows:
                u = rows[0]
                self.line(
                    f"plan: {format_bytes(cmp.plan.bytes)} at measured loss {_loss(cmp.plan.divergence)};"
                    f" smallest uniform setting meeting the target ({u.label}):"
                    f" {format_bytes(u.bytes)} at {_loss(u.divergence)}"
                    f" — the plan is {u.bytes / cmp.plan.bytes:.2f}x smaller"
                )
            return
        best_fit = cmp.best_uniform(fitting_only=True)
        if best_fit is not None:
            delta = cmp.score(cmp.plan) - cmp.score(best_fit)
            verdict = "beats" if delta > 0 else "does not beat"
            self.line(
                f"plan {verdict} the best measured uniform setting that fits ({best_fit.label}): "
                f"{_versus(cmp, cmp.plan, best_fit)}" + _elsewhere(cmp, cmp.plan, best_fit)
            )
        peer = cmp.best_peer()
        if peer is not None:
            verdict = "beats" if cmp.score(cmp.plan) > cmp.score(peer) else "does not beat"
            versus = _versus(cmp, cmp.plan, peer)
            self.line(f"plan {verdict} the best peer ({peer.label}, {peer.bpw:.3f} bpw): {versus}"
                      + _elsewhere(cmp, cmp.plan, peer))  # fmt: skip


def _scored(table: ProfileTable) -> str:
    """Where the scores read part of the calibration data: how much of it GPTQ's `H` read."""
    split, scored = table.data, table.settings.get("scored_batches")
    if scored is None or split is None:
        return ""
    return f" (GPTQ's H from all {split.calibration} calibration {split.unit})"
