"""From a `ProfileTable` and budgets to a `Plan`: build the problem, solve it, decode it.

This is the only place where profiler output meets the solver layer: layer profiles become
rows of numbers (`solvers.Problem`), the `Solution` becomes a `Plan` keyed by layer name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from profilers.specs import Choice, ProfileTable, encode_indices
from solvers import Problem, Status
from solvers import solve as solve_problem

from .budget import Budget, Resource, format_bops, format_bytes
from .errors import AllocatorError, InfeasibleBudgetError
from .plan import LayerPlan, Plan, Predicted, SolverReport, UniformPoint

__all__ = ["plan_from_profile", "resource_limits", "uniform_points"]


def _common_choices(profile: ProfileTable) -> list[Choice]:
    """Choices every layer was profiled with, in the first layer's order."""
    first = [o.choice for o in profile.layers[0].options]
    common = set(first)
    for layer in profile.layers[1:]:
        common &= {o.choice for o in layer.options}
    return [c for c in first if c in common]


def resource_limits(profile: ProfileTable, budgets: Sequence[Budget]) -> dict[Resource, int]:
    """Solver limit per resource; of several budgets on one resource the tightest wins."""
    limits: dict[Resource, int] = {}
    for b in budgets:
        limit = b.limit(
            fp16_bytes=profile.fp16_bytes,
            fixed_bytes=profile.fixed_bytes,
            quantizable_params=profile.quantizable_params,
        )
        limits[b.resource] = min(limit, limits.get(b.resource, limit))
    return limits


def _infeasible_message(
    profile: ProfileTable,
    budgets: Sequence[Budget],
    limits: dict[Resource, int],
    minimum: dict[Resource, int],
) -> str:
    parts = []
    for b in budgets:
        if minimum[b.resource] <= limits[b.resource]:
            continue
        least = b.describe_minimum(
            minimum[b.resource],
            fp16_bytes=profile.fp16_bytes,
            fixed_bytes=profile.fixed_bytes,
            quantizable_params=profile.quantizable_params,
        )
        parts.append(
            f"budget {b.text} is below the smallest plan the profile allows ({least}); raise it to at least {least}"
        )
    if not parts:
        parts.append(
            "the budgets are each reachable alone but not together; raise one of them"
            " or widen the choice grid (--bits/--group-size)"
        )
    return "; ".join(parts)


def plan_from_profile(
    profile: ProfileTable,
    budgets: Sequence[Budget | str],
    *,
    ties: Sequence[Sequence[str]] = (),
    method: str = "auto",
    gap: float = 1e-6,
    time_limit: float = 10.0,
) -> Plan:
    """Solve the allocation for `budgets` and return the `Plan`.

    Args:
        profile: per-layer, per-choice costs and losses.
        budgets: one or more budgets (at most one per resource is binding).
        ties: groups of layer names that must take the same choice.
        method: solver backend (`auto`, `greedy`, `cpsat`, `exhaustive`).
        gap: relative gap accepted without an exact solve (`auto`).
        time_limit: seconds for an exact solve.

    Raises:
        BudgetError, InfeasibleBudgetError, AllocatorError.
    """
    budgets = [Budget.parse(b) for b in budgets]
    if not budgets:
        raise AllocatorError("no budget given: pass at least one, e.g. --budget 12MB")
    choices = _common_choices(profile)
    if not choices:
        raise AllocatorError("the profile's layers share no common choice; re-profile with one choice grid")
    limits = resource_limits(profile, budgets)
    resources: list[Resource] = list(limits)
    names = profile.names
    index = {n: i for i, n in enumerate(names)}

    losses, costs = [], []
    for layer in profile.layers:
        by_choice = {o.choice: o for o in layer.options}
        opts = [by_choice[c] for c in choices]
        losses.append(np.array([o.loss for o in opts]))
        costs.append(np.array([[o.bytes if r == "bytes" else o.bops for r in resources] for o in opts], dtype=np.int64))

    tie_index = []
    for group in ties:
        unknown = [n for n in group if n not in index]
        if unknown:
            raise AllocatorError(f"tie group names layer(s) not in the profile: {', '.join(unknown[:3])}")
        if len(group) > 1:
            tie_index.append([index[n] for n in group])

    budget_vec = np.array([limits[r] for r in resources], dtype=np.int64)
    minimum = {r: int(sum(c[:, k].min() for c in costs)) for k, r in enumerate(resources)}
    if np.any(budget_vec < 0) or any(minimum[r] > limits[r] for r in resources):
        raise InfeasibleBudgetError(_infeasible_message(profile, budgets, limits, minimum))

    problem = Problem(losses=losses, costs=costs, budgets=budget_vec, ties=tie_index)
    solution = solve_problem(problem, method=method, gap=gap, time_limit=time_limit)  # type: ignore[arg-type]
    if solution.status is Status.INFEASIBLE or solution.choice is None:
        if solution.min_budgets is not None:
            minimum = {r: int(m) for r, m in zip(resources, solution.min_budgets, strict=True)}
        raise InfeasibleBudgetError(_infeasible_message(profile, budgets, limits, minimum))

    layers: dict[str, LayerPlan] = {}
    for layer, j in zip(profile.layers, solution.choice, strict=True):
        opt = layer.option(choices[j])
        layers[layer.spec.name] = LayerPlan(
            choice=opt.choice,
            shape=layer.spec.shape,
            aliases=layer.spec.aliases,
            bytes=opt.bytes,
            bops=opt.bops,
            loss=opt.loss,
            extra_rows=encode_indices(layer.extra_rows(opt.choice)) if opt.choice.extra else None,
        )
    q_bytes = sum(lp.bytes for lp in layers.values())
    predicted = Predicted(
        bytes=q_bytes + profile.fixed_bytes,
        quantized_bytes=q_bytes,
        bpw=8 * q_bytes / profile.quantizable_params,
        bops=sum(lp.bops for lp in layers.values()),
        loss=float(solution.objective),
    )
    return Plan(
        model_name=profile.model_name,
        model_fingerprint=profile.model_fingerprint,
        data_fingerprint=profile.data_fingerprint,
        profiler=profile.profiler,
        loss_units=profile.loss_units,
        budgets=tuple(budgets),
        limits=dict(limits),
        fixed_bytes=profile.fixed_bytes,
        kept_fp16=profile.kept_fp16,
        ties=tuple(tuple(names[i] for i in g) for g in tie_index),
        layers=layers,
        predicted=predicted,
        solver=SolverReport(
            method=method,
            backend=solution.solver,
            status=solution.status.value,  # type: ignore[arg-type]
            objective=float(solution.objective),
            lower_bound=float(solution.lower_bound),
            gap=float(solution.gap),
        ),
        uniform=tuple(uniform_points(profile, limits, choices)),
    )


def uniform_points(
    profile: ProfileTable, limits: dict[Resource, int], choices: Sequence[Choice] | None = None
) -> list[UniformPoint]:
    """Every quantized whole-term choice applied to all layers, priced by the profile; least
    loss first. (Fractional choices are not uniform settings: their rows differ per layer.)"""
    points = []
    for c in choices if choices is not None else _common_choices(profile):
        if not c.quantized or c.extra:
            continue
        opts = [layer.option(c) for layer in profile.layers]
        q_bytes = sum(o.bytes for o in opts)
        bops = sum(o.bops for o in opts)
        fits = q_bytes <= limits.get("bytes", q_bytes) and bops <= limits.get("bops", bops)
        points.append(
            UniformPoint(
                choice=c,
                bytes=q_bytes + profile.fixed_bytes,
                bpw=8 * q_bytes / profile.quantizable_params,
                bops=bops,
                loss=float(sum(o.loss for o in opts)),
                fits=fits,
            )
        )
    points.sort(key=lambda p: (p.loss, p.bytes))
    return points


def describe_limits(limits: dict[Resource, int], fixed_bytes: int) -> str:
    parts = []
    if "bytes" in limits:
        parts.append(f"{format_bytes(limits['bytes'] + fixed_bytes)} whole model")
    if "bops" in limits:
        parts.append(format_bops(limits["bops"]))
    return ", ".join(parts)
