"""The cost–quality frontier: optimal plans over a sweep of budgets, as CSV (and a plot,
`allocator.measure.plots.plot_frontier`).

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

from profilers.files import atomic_write_text
from profilers.types import ProfileTable

from ..errors import AllocatorError, InfeasibleBudgetError
from .budget import Budget
from .build import plan_from_profile
from .plan import Constraints, Plan
from .uniform import uniform_points

__all__ = ["FrontierPoint", "Skipped", "budget_sweep", "sweep", "write_csv"]


@dataclass
class Skipped:
    """A budget of the sweep no plan fits, and why."""

    budget: str
    reason: str


@dataclass
class FrontierPoint:
    """One plan of the sweep (and, once measured, its measured loss)."""

    budget: str
    plan: Plan
    measured_loss: float | None = None


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
    skipped: list[Skipped] | None = None,
) -> list[FrontierPoint]:
    """Solve every budget. Budgets no plan fits are left out of the result and, with the
    reason, appended to `skipped` when given."""
    report = progress or (lambda stage, done, total: None)
    points = []
    missed: list[Skipped] = [] if skipped is None else skipped
    for k, b in enumerate(budgets):
        report("solving", k, len(budgets))
        try:
            plan = plan_from_profile(
                profile, [b], constraints=constraints, solver=solver, gap=gap, time_limit=time_limit
            )
        except InfeasibleBudgetError as e:
            missed.append(Skipped(b.text, str(e)))
            continue
        points.append(FrontierPoint(budget=b.text, plan=plan))
    report("solving", len(budgets), len(budgets))
    if not points:
        raise InfeasibleBudgetError(
            f"no budget of the sweep admits a plan ({missed[-1].reason}); start the sweep higher (--from)"
        )
    return points


def write_csv(points: Sequence[FrontierPoint], profile: ProfileTable, path: str | os.PathLike[str]) -> Path:
    """One row per plan and per uniform setting (`kind` tells them apart), written atomically."""
    buf = io.StringIO()
    out = csv.writer(buf)
    out.writerow(["kind", "budget", "setting", "bytes", "bpw", "bops", "predicted_loss", "lower_bound", "gap",
                  "status", "measured_loss"])  # fmt: skip
    for p in points:
        s = p.plan.solver
        out.writerow([
            "plan", p.budget, "", p.plan.predicted.bytes, f"{p.plan.predicted.bpw:.6f}", p.plan.predicted.bops,
            f"{p.plan.predicted.loss:.9g}", f"{s.lower_bound:.9g}", f"{s.gap:.3g}", s.status,
            "" if p.measured_loss is None else f"{p.measured_loss:.9g}",
        ])  # fmt: skip
    for u in uniform_points(profile, {}):
        out.writerow(["uniform", "", u.choice.label, u.bytes, f"{u.bpw:.6f}", u.bops, f"{u.loss:.9g}",
                      "", "", "", ""])  # fmt: skip
    return atomic_write_text(path, buf.getvalue())
