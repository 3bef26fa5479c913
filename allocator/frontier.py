"""The cost–quality frontier: optimal plans over a sweep of budgets, as CSV and a plot.

Every point is a solved plan (`plan_from_profile`) with its proven gap; uniform settings are
priced on the same profile and drawn on the same axes, so the gain of planning is visible at
every size, and the measured loss of each plan can be added beside its prediction.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from profilers.files import atomic_write_bytes, atomic_write_text
from profilers.specs import ProfileTable

from .budget import Budget
from .errors import AllocatorError, InfeasibleBudgetError
from .plan import Constraints, Plan
from .planning import plan_from_profile, uniform_points

__all__ = ["FrontierPoint", "budget_sweep", "plot_frontier", "sweep", "write_csv"]


@dataclass
class FrontierPoint:
    """One plan of the sweep (and, once measured, its measured loss)."""

    budget: str
    plan: Plan
    measured_loss: float | None = None
    measured_quality: float | None = None


def budget_sweep(start: Budget, stop: Budget, points: int) -> list[Budget]:
    """`points` budgets of one kind, evenly spaced from `start` to `stop`."""
    if start.kind != stop.kind:
        raise AllocatorError(f"--from {start.text} and --to {stop.text} must be the same kind of budget")
    if points < 2:
        raise AllocatorError(f"--points must be at least 2, got {points}")
    if stop.value <= start.value:
        raise AllocatorError(f"--to {stop.text} must be larger than --from {start.text}")
    unit = {"bytes": "B", "bpw": "bpw", "fraction": "%", "bops": "BOPs"}[start.kind]
    out = []
    for v in np.linspace(start.value, stop.value, points):
        text = f"{v * 100:.4f}%" if start.kind == "fraction" else f"{v:.6g}{unit}" if unit != "B" else f"{int(v)}B"
        out.append(Budget.parse(text))
    return out


def sweep(
    profile: ProfileTable,
    budgets: Sequence[Budget],
    *,
    constraints: Constraints | None = None,
    solver: str = "auto",
    gap: float = 1e-6,
    time_limit: float = 10.0,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[FrontierPoint]:
    """Solve every budget; budgets no plan fits are skipped."""
    report = progress or (lambda stage, done, total: None)
    points = []
    for k, b in enumerate(budgets):
        report("solving", k, len(budgets))
        try:
            plan = plan_from_profile(
                profile, [b], constraints=constraints, solver=solver, gap=gap, time_limit=time_limit
            )
        except InfeasibleBudgetError:
            continue
        points.append(FrontierPoint(budget=b.text, plan=plan))
    report("solving", len(budgets), len(budgets))
    if not points:
        raise InfeasibleBudgetError("no budget of the sweep admits a plan; start the sweep higher (--from)")
    return points


def write_csv(points: Sequence[FrontierPoint], profile: ProfileTable, path: str | os.PathLike[str]) -> Path:
    """One row per plan and per uniform setting (`kind` tells them apart), written atomically."""
    buf = io.StringIO()
    out = csv.writer(buf)
    out.writerow(["kind", "budget", "setting", "bytes", "bpw", "bops", "predicted_loss", "lower_bound", "gap",
                  "status", "measured_loss", "measured_quality"])  # fmt: skip
    for p in points:
        s = p.plan.solver
        out.writerow([
            "plan", p.budget, "", p.plan.predicted.bytes, f"{p.plan.predicted.bpw:.6f}", p.plan.predicted.bops,
            f"{p.plan.predicted.loss:.9g}", f"{s.lower_bound:.9g}", f"{s.gap:.3g}", s.status,
            "" if p.measured_loss is None else f"{p.measured_loss:.9g}",
            "" if p.measured_quality is None else f"{p.measured_quality:.9g}",
        ])  # fmt: skip
    for u in uniform_points(profile, {}):
        out.writerow(["uniform", "", u.choice.label, u.bytes, f"{u.bpw:.6f}", u.bops, f"{u.loss:.9g}",
                      "", "", "", "", ""])  # fmt: skip
    return atomic_write_text(path, buf.getvalue())


def plot_frontier(
    points: Sequence[FrontierPoint], profile: ProfileTable, path: str | os.PathLike[str], *, title: str = ""
) -> Path:
    """PNG of predicted (and measured) loss against model size, uniform settings as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    mb = [p.plan.predicted.bytes / 1e6 for p in points]
    ax.plot(mb, [p.plan.predicted.loss for p in points], "-", color="tab:blue", lw=2, label="plan, predicted")
    measured = [(m, p.measured_loss) for m, p in zip(mb, points, strict=True) if p.measured_loss is not None]
    if measured:
        ax.plot(*zip(*measured, strict=True), "o", color="tab:blue", mfc="white", label="plan, measured")
    lo, hi = min(mb), max(mb)
    uniform = [u for u in uniform_points(profile, {}) if lo * 0.8 <= u.bytes / 1e6 <= hi * 1.2]
    if uniform:
        ax.scatter([u.bytes / 1e6 for u in uniform], [u.loss for u in uniform], marker="s", color="tab:orange",
                   label="uniform settings, predicted", zorder=3)  # fmt: skip
        for u in uniform:
            ax.annotate(u.choice.label, (u.bytes / 1e6, u.loss), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("model size, MB (quantized weights with scales + everything kept in fp16)")
    ax.set_ylabel(f"loss [{profile.loss_units}]")
    ax.set_title(title or f"{profile.model_name}: optimal plans vs uniform settings")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
