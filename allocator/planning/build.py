"""From a `ProfileTable`, budgets and constraints to a `Plan`: build the problem, solve, decode.

This is the only place where profiler output meets the solver layer: layer profiles become
rows of numbers (`solvers.Problem`), the `Solution` becomes a `Plan` keyed by layer name.

    plan_from_profile
      ├─ resource_limits     budgets -> a limit per resource (bytes, BOPs)
      ├─ allowed_options     pins, forbidden choices, kept layers, device bits -> masks
      ├─ _problem            losses and costs as matrices, ties as indices, feasibility checked
      ├─ _solve              the solver, its failures reworded as budget advice
      └─ _decode             choices back to layer names, predicted totals, uniform settings
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from profilers.types import Choice, ProfileTable, encode_indices
from solvers import NO_LIMIT, Problem, Solution, Status
from solvers import solve as solve_problem

from ..errors import AllocatorError, InfeasibleBudgetError, SolveTimeoutError
from .budget import Budget, Resource
from .constraints import allowed_options
from .plan import Constraints, LayerPlan, Plan, Predicted, SolverReport
from .uniform import all_choices, common_choices, uniform_points

__all__ = ["plan_from_profile", "resource_limits"]


def resource_limits(profile: ProfileTable, budgets: Sequence[Budget]) -> dict[Resource, int]:
    """Solver limit per resource; of several budgets on one resource the tightest wins."""
    limits: dict[Resource, int] = {}
    for b in budgets:
        limit = b.limit(
            fp16_bytes=profile.fp16_bytes,
            fixed_bytes=profile.fixed_bytes + profile.file_overhead,
            quantizable_params=profile.quantizable_params,
        )
        limits[b.resource] = min(limit, limits.get(b.resource, limit))
    return limits


def plan_from_profile(
    profile: ProfileTable,
    budgets: Sequence[Budget | str] = (),
    *,
    ties: Sequence[Sequence[str]] = (),
    constraints: Constraints | None = None,
    solver: str = "auto",
    gap: float = 1e-6,
    time_limit: float = 10.0,
) -> Plan:
    """Solve the allocation and return the `Plan`.

    Args:
        profile: per-layer, per-choice costs and losses.
        budgets: budgets (at most one per resource binds); may be empty with `max_loss`.
        ties: groups of layer names that must take the same choice.
        constraints: pins, forbidden choices, kept layers, device bits, and `max_loss` (then
            the plan is the smallest whose predicted loss is at most `max_loss`).
        solver: solver backend (`auto`, `greedy`, `cpsat`, `milp`, `lp`, `exhaustive`).
        gap: relative gap accepted as optimal.
        time_limit: seconds for exact work.

    Raises:
        BudgetError, InfeasibleBudgetError, AllocatorError.
    """
    constraints = constraints or Constraints()
    parsed = [Budget.parse(b) for b in budgets]
    if not parsed and constraints.max_loss is None:
        raise AllocatorError("no budget given: pass one, e.g. --budget 12MB, or ask for --max-loss")
    choices = all_choices(profile)
    limits = resource_limits(profile, parsed)
    if constraints.max_loss is not None:  # lossless mode minimises bytes: bytes come first
        limits = {"bytes": limits.get("bytes", NO_LIMIT), **{k: v for k, v in limits.items() if k != "bytes"}}
    problem, tie_index = _problem(profile, parsed, choices, limits, ties, constraints)
    solution = _solve(problem, profile, parsed, limits, constraints, solver, gap, time_limit)
    return _decode(profile, parsed, choices, limits, tie_index, constraints, solution,
                   SolverReport(method=solver, backend=solution.solver, status=solution.status.value,  # type: ignore[arg-type]
                                objective=float(solution.objective),
                                objective_is="bytes" if constraints.max_loss is not None else "loss",
                                lower_bound=float(solution.lower_bound), gap=float(solution.gap), gap_limit=gap,
                                time_limit=time_limit))  # fmt: skip


def _problem(
    profile: ProfileTable,
    budgets: list[Budget],
    choices: list[Choice],
    limits: dict[Resource, int],
    ties: Sequence[Sequence[str]],
    constraints: Constraints,
) -> tuple[Problem, list[list[int]]]:
    """The solver's problem (loss and cost matrices, masks, tie indices), refused when no plan
    can fit the budgets or reach `max_loss` even in the best case."""
    resources: list[Resource] = list(limits)
    index = {n: i for i, n in enumerate(profile.names)}
    losses, costs = [], []
    for layer in profile.layers:  # a choice a layer lacks costs nothing there and is masked out
        opts = [layer.by_choice.get(c) for c in choices]
        losses.append(np.array([o.loss if o else 0.0 for o in opts]))
        costs.append(np.array([[(o.bytes if r == "bytes" else o.bops) if o else 0 for r in resources] for o in opts],
                              dtype=np.int64))  # fmt: skip
    allowed = allowed_options(profile, choices, constraints)
    tie_index = []
    for group in ties:
        unknown = [n for n in group if n not in index]
        if unknown:
            raise AllocatorError(f"tie group names layer(s) not in the profile: {', '.join(unknown[:3])}")
        if len(group) > 1:
            tie_index.append([index[n] for n in group])

    budget_vec = np.array([limits[r] for r in resources], dtype=np.int64)
    try:
        problem = Problem(losses=losses, costs=costs, budgets=budget_vec, ties=tie_index, allowed=allowed,
                          max_loss=constraints.max_loss)  # fmt: skip
    except ValueError as e:
        raise AllocatorError(str(e)) from None
    minimum = dict(zip(resources, _least_costs(problem), strict=True))
    if np.any(budget_vec < 0) or any(minimum[r] > limits[r] for r in resources):
        raise InfeasibleBudgetError(_budget_message(profile, budgets, limits, minimum))
    least_loss = float(sum(ls[a].min() for ls, a in zip(losses, allowed, strict=True)))
    if constraints.max_loss is not None and least_loss > constraints.max_loss:
        raise InfeasibleBudgetError(
            f"no plan reaches predicted loss {constraints.max_loss:g}: the least the profile allows is "
            f"{least_loss:.3g} (every layer at its most accurate allowed option); raise --max-loss or add terms"
        )
    return problem, tie_index


def _solve(
    problem: Problem,
    profile: ProfileTable,
    budgets: list[Budget],
    limits: dict[Resource, int],
    constraints: Constraints,
    solver: str,
    gap: float,
    time_limit: float,
) -> Solution:
    """Run the solver; a solve that found no plan becomes a one-line error saying what to raise."""
    try:
        solution = solve_problem(problem, method=solver, gap=gap, time_limit=time_limit)  # type: ignore[arg-type]
    except ValueError as e:
        raise AllocatorError(str(e)) from None
    if solution.status is not Status.INFEASIBLE and solution.choice is not None:
        return solution
    if solution.status is Status.TIMEOUT:
        raise SolveTimeoutError(f"the {solver} solver found no plan within {time_limit:g}s; raise --time-limit")
    if constraints.max_loss is not None and "bytes" in limits and limits["bytes"] < NO_LIMIT:
        raise InfeasibleBudgetError(
            f"the smallest plan with predicted loss at most {constraints.max_loss:g} does not fit "
            f"{', '.join(b.text for b in budgets)}; raise the budget or --max-loss"
        )
    least = solution.min_budgets if solution.min_budgets is not None else _least_costs(problem)
    minimum = {r: int(m) for r, m in zip(limits, least, strict=False)}
    raise InfeasibleBudgetError(_budget_message(profile, budgets, limits, minimum))


def _least_costs(problem: Problem) -> list[int]:
    """Per resource, the least any plan spends (every layer at its cheapest allowed option)."""
    return [int(sum(c[a, k].min() for c, a in zip(problem.costs, problem.allowed, strict=True)))  # type: ignore[arg-type]
            for k in range(len(problem.budgets))]  # fmt: skip


def _decode(
    profile: ProfileTable,
    budgets: list[Budget],
    choices: list[Choice],
    limits: dict[Resource, int],
    tie_index: list[list[int]],
    constraints: Constraints,
    solution: Solution,
    report: SolverReport,
) -> Plan:
    """The plan file: each layer's choice by name, predicted totals, and every uniform setting."""
    assert solution.choice is not None
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
    binding = {r: int(v) for r, v in limits.items() if v < NO_LIMIT}
    names = profile.names
    return Plan(
        model_name=profile.model_name,
        model_fingerprint=profile.model_fingerprint,
        data_fingerprint=profile.data_fingerprint,
        data=profile.data,
        profiler=profile.profiler,
        target_format="gguf" if profile.settings.get("format") == "gguf" else "native",
        method=str(profile.settings.get("method", "rtn")),
        sequential=bool(profile.settings.get("sequential", False)),
        scored_batches=profile.settings.get("scored_batches"),
        loss_units=profile.loss_units,
        budgets=tuple(budgets),
        limits=binding,
        constraints=constraints,
        fixed_bytes=profile.fixed_bytes,
        kept_fp16=profile.kept_fp16,
        ties=tuple(tuple(names[i] for i in g) for g in tie_index),
        layers=layers,
        predicted=Predicted(
            bytes=q_bytes + profile.fixed_bytes + profile.file_overhead,
            quantized_bytes=q_bytes,
            file_overhead=profile.file_overhead,
            bpw=8 * q_bytes / profile.quantizable_params,
            bops=sum(lp.bops for lp in layers.values()),
            loss=float(solution.loss),
        ),
        solver=report,
        uniform=tuple(uniform_points(profile, binding, common_choices(profile))),
    )


def _budget_message(
    profile: ProfileTable, budgets: Sequence[Budget], limits: dict[Resource, int], minimum: dict[Resource, int]
) -> str:
    """Which budget is too small and the least it must be (or that the budgets clash)."""
    parts = []
    for b in budgets:
        if minimum[b.resource] <= limits[b.resource]:
            continue
        least = b.describe_minimum(
            minimum[b.resource],
            fp16_bytes=profile.fp16_bytes,
            fixed_bytes=profile.fixed_bytes + profile.file_overhead,
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
