"""From a `ProfileTable`, budgets and constraints to a `Plan`: build the problem, solve, decode.

This is the only place where profiler output meets the solver layer: layer profiles become
rows of numbers (`solvers.Problem`), the `Solution` becomes a `Plan` keyed by layer name.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import numpy as np

from profilers.specs import Choice, ProfileTable, encode_indices
from solvers import NO_LIMIT, Problem, Status
from solvers import solve as solve_problem

from .budget import Budget, Resource, format_bops, format_bytes
from .errors import AllocatorError, InfeasibleBudgetError, SolveTimeoutError
from .plan import Constraints, LayerPlan, Plan, Predicted, SolverReport, UniformPoint

__all__ = ["allowed_options", "plan_from_profile", "resource_limits", "uniform_points"]


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
            fixed_bytes=profile.fixed_bytes + profile.file_overhead,
            quantizable_params=profile.quantizable_params,
        )
        limits[b.resource] = min(limit, limits.get(b.resource, limit))
    return limits


def allowed_options(profile: ProfileTable, choices: Sequence[Choice], constraints: Constraints) -> list[np.ndarray]:
    """Per layer, which of `choices` the constraints allow.

    Raises:
        AllocatorError: a pattern that matches no layer, a pinned choice that was not profiled,
            or a layer left with no option.
    """
    names = [layer.spec.name for layer in profile.layers]
    labels = [c.label for c in choices]
    masks = [np.ones(len(choices), dtype=bool) for _ in names]

    def matching(pattern: str, what: str) -> list[int]:
        hits = [i for i, n in enumerate(names) if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            hint = "; layers kept at profile time are already left out" if what == "--keep" else ""
            raise AllocatorError(
                f"{what} pattern {pattern!r} matches no profiled layer (names look like {names[0]!r}){hint}"
            )
        return hits

    if constraints.device_bits is not None:
        ok = np.array([c.quantized and c.bits <= constraints.device_bits for c in choices])
        if not ok.any():
            raise AllocatorError(
                f"no profiled choice has at most {constraints.device_bits} bits per term; "
                f"profile with --device-bits {constraints.device_bits}"
            )
        masks = [m & ok for m in masks]
    for pattern in constraints.keep:
        if Choice.fp16() not in choices:
            raise AllocatorError("--keep needs the fp16 option in the profile")
        fp = np.array([not c.quantized for c in choices])
        for i in matching(pattern, "--keep"):
            masks[i] = masks[i] & fp
    for pattern, label in constraints.pins:
        wanted = Choice.parse(label).label
        if wanted not in labels:
            raise AllocatorError(f"--pin asks for {wanted}, which the profile has no numbers for; profile it first")
        pin = np.array([x == wanted for x in labels])
        for i in matching(pattern, "--pin"):
            masks[i] = masks[i] & pin
    for pattern, label_pattern in constraints.forbid:
        banned = np.array([fnmatch.fnmatchcase(x, label_pattern) for x in labels])
        if not banned.any():
            raise AllocatorError(f"--forbid choice pattern {label_pattern!r} matches no profiled choice")
        for i in matching(pattern, "--forbid"):
            masks[i] = masks[i] & ~banned
    for i, m in enumerate(masks):
        if not m.any():
            raise AllocatorError(f"layer {names[i]!r} has no option left after --pin/--forbid/--keep/--device-bits")
    return masks


def _budget_message(
    profile: ProfileTable, budgets: Sequence[Budget], limits: dict[Resource, int], minimum: dict[Resource, int]
) -> str:
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
    budgets = [Budget.parse(b) for b in budgets]
    if not budgets and constraints.max_loss is None:
        raise AllocatorError("no budget given: pass one, e.g. --budget 12MB, or ask for --max-loss")
    choices = _common_choices(profile)
    if not choices:
        raise AllocatorError("the profile's layers share no common choice; re-profile with one choice grid")
    limits = resource_limits(profile, budgets)
    if constraints.max_loss is not None:
        limits = {"bytes": limits.get("bytes", NO_LIMIT), **{k: v for k, v in limits.items() if k != "bytes"}}
    resources: list[Resource] = list(limits)
    names = profile.names
    index = {n: i for i, n in enumerate(names)}

    losses, costs = [], []
    for layer in profile.layers:
        opts = [layer.option(c) for c in choices]
        losses.append(np.array([o.loss for o in opts]))
        costs.append(np.array([[o.bytes if r == "bytes" else o.bops for r in resources] for o in opts], dtype=np.int64))
    allowed = allowed_options(profile, choices, constraints)

    tie_index = []
    for group in ties:
        unknown = [n for n in group if n not in index]
        if unknown:
            raise AllocatorError(f"tie group names layer(s) not in the profile: {', '.join(unknown[:3])}")
        if len(group) > 1:
            tie_index.append([index[n] for n in group])

    budget_vec = np.array([limits[r] for r in resources], dtype=np.int64)
    minimum = {r: int(sum(c[a, k].min() for c, a in zip(costs, allowed, strict=True))) for k, r in enumerate(resources)}
    if np.any(budget_vec < 0) or any(minimum[r] > limits[r] for r in resources):
        raise InfeasibleBudgetError(_budget_message(profile, budgets, limits, minimum))
    least_loss = float(sum(ls[a].min() for ls, a in zip(losses, allowed, strict=True)))
    if constraints.max_loss is not None and least_loss > constraints.max_loss:
        raise InfeasibleBudgetError(
            f"no plan reaches predicted loss {constraints.max_loss:g}: the least the profile allows is "
            f"{least_loss:.3g} (every layer at its most accurate allowed option); raise --max-loss or add terms"
        )

    try:
        problem = Problem(
            losses=losses,
            costs=costs,
            budgets=budget_vec,
            ties=tie_index,
            allowed=allowed,
            max_loss=constraints.max_loss,
        )
        solution = solve_problem(problem, method=solver, gap=gap, time_limit=time_limit)  # type: ignore[arg-type]
    except ValueError as e:
        raise AllocatorError(str(e)) from None
    if solution.status is Status.INFEASIBLE or solution.choice is None:
        if solution.status is Status.TIMEOUT:
            raise SolveTimeoutError(f"the {solver} solver found no plan within {time_limit:g}s; raise --time-limit")
        if constraints.max_loss is not None and "bytes" in limits and limits["bytes"] < NO_LIMIT:
            raise InfeasibleBudgetError(
                f"the smallest plan with predicted loss at most {constraints.max_loss:g} does not fit "
                f"{', '.join(b.text for b in budgets)}; raise the budget or --max-loss"
            )
        if solution.min_budgets is not None:
            minimum = {r: int(m) for r, m in zip(resources, solution.min_budgets, strict=False)}
        raise InfeasibleBudgetError(_budget_message(profile, budgets, limits, minimum))

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
        bytes=q_bytes + profile.fixed_bytes + profile.file_overhead,
        quantized_bytes=q_bytes,
        file_overhead=profile.file_overhead,
        bpw=8 * q_bytes / profile.quantizable_params,
        bops=sum(lp.bops for lp in layers.values()),
        loss=float(solution.loss),
    )
    return Plan(
        model_name=profile.model_name,
        model_fingerprint=profile.model_fingerprint,
        data_fingerprint=profile.data_fingerprint,
        data=profile.data,
        profiler=profile.profiler,
        method=str(profile.settings.get("method", "rtn")),
        loss_units=profile.loss_units,
        budgets=tuple(budgets),
        limits={r: int(v) for r, v in limits.items() if v < NO_LIMIT},
        constraints=constraints,
        fixed_bytes=profile.fixed_bytes,
        kept_fp16=profile.kept_fp16,
        ties=tuple(tuple(names[i] for i in g) for g in tie_index),
        layers=layers,
        predicted=predicted,
        solver=SolverReport(
            method=solver,
            backend=solution.solver,
            status=solution.status.value,  # type: ignore[arg-type]
            objective=float(solution.objective),
            objective_is="bytes" if constraints.max_loss is not None else "loss",
            lower_bound=float(solution.lower_bound),
            gap=float(solution.gap),
            gap_limit=gap,
            time_limit=time_limit,
        ),
        uniform=tuple(uniform_points(profile, {r: v for r, v in limits.items() if v < NO_LIMIT}, choices)),
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
                bytes=q_bytes + profile.fixed_bytes + profile.file_overhead,
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
