"""One entry point over the backends: `solve(problem, method=...)`.

| method       | what it does                                                                    |
|--------------|---------------------------------------------------------------------------------|
| `greedy`     | hull greedy with fill and swap polish, certified by the LP bound (one budget)   |
| `cpsat`      | OR-Tools CP-SAT, exact (any number of budgets), warm-started                     |
| `milp`       | cvxpy MILP on HiGHS, exact to HiGHS's gap                                       |
| `lp`         | the LP relaxation (the continuous bound), rounded and repaired to a plan        |
| `exhaustive` | every plan (tiny problems)                                                      |
| `auto`       | greedy (or LP + repair with several budgets) → reduced-cost fixing with the     |
|              | LP multipliers → CP-SAT on the few layers left; keeps the best, proves its gap  |
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np

from .cpsat import cpsat_instance
from .exhaustive import exhaustive_instance
from .greedy import hull_greedy
from .heuristic import repair_and_fill
from .instance import Instance, build_instance
from .lagrange import lagrangian_bound, reduce_instance
from .milp import linear_instance
from .problem import Problem, Solution, Status

__all__ = ["METHODS", "Method", "solve"]

Method = Literal["auto", "greedy", "cpsat", "milp", "lp", "exhaustive"]
METHODS: tuple[str, ...] = ("auto", "greedy", "cpsat", "milp", "lp", "exhaustive")


def _gap(objective: float, lower: float) -> float:
    if objective <= 0:
        return 0.0
    return max(0.0, (objective - lower) / abs(objective))


def solve(
    problem: Problem,
    *,
    method: Method = "auto",
    gap: float = 1e-6,
    time_limit: float = 10.0,
    workers: int = 2,
) -> Solution:
    """Pick one option per layer for the problem's question (see `solvers.problem`).

    Args:
        problem: the instance.
        method: see the module docstring.
        gap: relative optimality gap accepted as proven optimal.
        time_limit: seconds for exact work (CP-SAT, HiGHS).
        workers: CP-SAT search workers.

    Returns:
        A `Solution`; check `status` before using `choice`. Its `lower_bound` is proven for
        every method and its `gap` is honest.

    Example:
        >>> p = Problem(losses=[np.array([4.0, 1.0, 0.0])] * 2,
        ...             costs=[np.array([[1], [2], [4]])] * 2, budgets=np.array([5]))
        >>> s = solve(p)
        >>> s.choice, s.objective, s.status.value
        ((1, 1), 2.0, 'optimal')
    """
    if method not in METHODS:
        raise ValueError(f"unknown solver {method!r}; choose one of {', '.join(METHODS)}")
    start = time.perf_counter()
    inst = build_instance(problem)
    minimum = inst.minimum_use()
    if np.any(minimum > inst.cap * (1 + 1e-12)):
        return _infeasible(problem, inst, method, start)

    if method == "greedy":
        picks, lower, status = _greedy(inst)
    elif method == "cpsat":
        res = cpsat_instance(inst, time_limit=time_limit, hint=_incumbent(inst, time_limit), workers=workers)
        picks, lower = res.picks, res.lower_bound
        status = Status.TIMEOUT if res.timed_out else Status.OPTIMAL if res.optimal else Status.FEASIBLE
    elif method == "milp":
        picks, lower, status = _milp(inst, time_limit, gap)
    elif method == "lp":
        picks, lower, status = _lp(inst, time_limit, workers)
    elif method == "exhaustive":
        picks = exhaustive_instance(inst)
        lower = inst.totals(picks)[0] if picks is not None else float("inf")
        status = Status.OPTIMAL
    else:
        picks, lower, status, method = _auto(inst, gap, time_limit, workers)

    if picks is None:
        if status is Status.TIMEOUT:
            return Solution(
                Status.TIMEOUT,
                None,
                float("inf"),
                lower,
                (0,) * problem.n_resources,
                method,
                time.perf_counter() - start,
            )
        return _infeasible(problem, inst, method, start)
    choice = _expand(problem, inst, picks)
    if problem.lossless and problem.evaluate(choice)[1][0] > problem.budgets[0]:
        return _infeasible(problem, inst, method, start)  # the cheapest plan within the loss cap is over budget
    if not problem.fits(choice):
        raise AssertionError(f"{method} returned a plan that breaks a budget; this is a bug")
    loss, cost = problem.evaluate(choice)
    objective = problem.objective(choice)
    lower = min(lower, objective)
    if status is not Status.TIMEOUT:
        status = Status.OPTIMAL if _gap(objective, lower) <= gap else Status.FEASIBLE
    return Solution(
        status=status,
        choice=choice,
        objective=objective,
        lower_bound=float(lower),
        cost=tuple(int(c) for c in cost),
        solver=method,
        wall_s=time.perf_counter() - start,
        loss=loss,
    )


def _expand(problem: Problem, inst: Instance, picks: np.ndarray) -> tuple[int, ...]:
    choice = [0] * problem.n_layers
    for item, j in zip(inst.items, picks, strict=True):
        for m in item.members:
            choice[m] = int(item.options[j])
    return tuple(choice)


def _infeasible(problem: Problem, inst: Instance, method: str, start: float) -> Solution:
    mins = tuple(float(sum(int(it.costs[:, r].min()) for it in inst.items)) for r in range(problem.n_resources))
    if problem.lossless:
        mins = (*mins, float(sum(it.losses.min() for it in inst.items)))
    return Solution(
        Status.INFEASIBLE,
        None,
        float("inf"),
        float("inf"),
        tuple(int(m) for m in mins[: problem.n_resources]),
        method,
        time.perf_counter() - start,
        min_budgets=mins,
    )


def _greedy(inst: Instance) -> tuple[np.ndarray | None, float, Status]:
    g = hull_greedy(inst)
    return g.picks, g.lower_bound, Status.FEASIBLE


def _incumbent(inst: Instance, time_limit: float) -> np.ndarray | None:
    """A good feasible plan to start exact solvers from."""
    if inst.n_constraints == 1:
        return hull_greedy(inst).picks
    lp = linear_instance(inst, integer=False, time_limit=time_limit)
    if lp.values is None:
        return None
    return repair_and_fill(inst, np.array([int(np.argmax(v)) for v in lp.values]))


def _milp(inst: Instance, time_limit: float, gap: float) -> tuple[np.ndarray | None, float, Status]:
    hint = _incumbent(inst, time_limit)
    reference = inst.totals(hint)[0] if hint is not None else None
    res = linear_instance(inst, integer=True, time_limit=time_limit, reference=reference, gap=gap / 10)
    if res.values is None:
        return hint, res.lower_bound, Status.TIMEOUT if res.status != "infeasible" else Status.INFEASIBLE
    picks = np.array([int(np.argmax(v)) for v in res.values])
    if not inst.feasible(picks):  # off by HiGHS's tolerance: repair in exact arithmetic
        picks = repair_and_fill(inst, picks)
    if hint is not None and (picks is None or inst.totals(hint)[0] < inst.totals(picks)[0]):
        picks = hint
    timed_out = res.status not in ("optimal",)
    return picks, res.lower_bound, Status.TIMEOUT if timed_out else Status.FEASIBLE


def _lp(inst: Instance, time_limit: float, workers: int) -> tuple[np.ndarray | None, float, Status]:
    res = linear_instance(inst, integer=False, time_limit=time_limit)
    if res.values is None:
        return None, res.lower_bound, Status.INFEASIBLE if res.status == "infeasible" else Status.TIMEOUT
    picks = repair_and_fill(inst, np.array([int(np.argmax(v)) for v in res.values]))
    if picks is None and inst.n_constraints == 1:
        picks = hull_greedy(inst).picks
    if picks is None:  # the rounding could not be repaired: ask CP-SAT for any plan
        found = cpsat_instance(inst, time_limit=time_limit, workers=workers)
        if found.picks is None:
            return None, res.lower_bound, Status.TIMEOUT if found.timed_out else Status.INFEASIBLE
        picks = found.picks
    return picks, res.lower_bound, Status.FEASIBLE


def _auto(inst: Instance, gap: float, time_limit: float, workers: int) -> tuple[np.ndarray | None, float, Status, str]:
    start = time.perf_counter()
    if inst.n_constraints == 1:
        g = hull_greedy(inst)
        if g.picks is None:
            return None, float("inf"), Status.INFEASIBLE, "greedy"
        picks, lower, multipliers, name = g.picks, g.lower_bound, np.array([g.multiplier]), "greedy"
    else:
        lp = linear_instance(inst, integer=False, time_limit=time_limit)
        if lp.values is None:
            return None, lp.lower_bound, Status.INFEASIBLE if lp.status == "infeasible" else Status.TIMEOUT, "lp"
        picks = repair_and_fill(inst, np.array([int(np.argmax(v)) for v in lp.values]))
        lower, multipliers, name = lp.lower_bound, lp.multipliers, "lp+repair"
        if picks is None:  # no rounding fits: let CP-SAT find a first plan
            res = cpsat_instance(inst, time_limit=time_limit, workers=workers)
            if res.picks is None:
                return None, lower, Status.TIMEOUT if res.timed_out else Status.INFEASIBLE, "cpsat"
            picks, lower = res.picks, max(lower, res.lower_bound)
            name = "cpsat"
    value = inst.totals(picks)[0]
    if _gap(value, lower) <= gap or multipliers is None:
        return picks, lower, Status.FEASIBLE, name

    # Reduced-cost fixing with the LP multipliers leaves few layers undecided: solve those exactly.
    red = reduce_instance(inst, multipliers, value, picks)
    lower = max(lower, red.bound)
    if _gap(value, lower) <= gap or not red.core:
        return picks, max(lower, value) if not red.core else lower, Status.FEASIBLE, name + "+fixing"
    sub = inst.restrict(red.core, red.keep, red.fixed)
    hint = np.array([int(np.flatnonzero(kept == picks[i])[0]) for i, kept in zip(red.core, red.keep, strict=True)])
    left = max(0.05, time_limit - (time.perf_counter() - start))
    res = cpsat_instance(sub, time_limit=left, hint=hint, workers=workers)
    fixed_value = sum(inst.obj[i][j] for i, j in red.fixed.items())
    name = f"{name}+fixing+cpsat({len(red.core)} of {len(inst.items)} layers)"
    if res.picks is not None:
        candidate = picks.copy()
        for i, kept, j in zip(red.core, red.keep, res.picks, strict=True):
            candidate[i] = kept[j]
        if inst.feasible(candidate) and inst.totals(candidate)[0] < value:
            picks, value = candidate, inst.totals(candidate)[0]
    # Any plan better than the incumbent uses the fixed options, so it costs at least this:
    lower = max(lower, min(value, fixed_value + res.lower_bound))
    return picks, lower, Status.TIMEOUT if res.timed_out and _gap(value, lower) > gap else Status.FEASIBLE, name


# Kept for callers that want the Lagrangian bound of a known plan.
lagrangian = lagrangian_bound
