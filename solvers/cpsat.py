"""Exact solver: OR-Tools CP-SAT on the multiple-choice knapsack, any number of resources.

CP-SAT needs integer coefficients. Losses are scaled *relative to the objective being
optimised* (the incumbent's), not to the largest loss: with
`q = floor(loss / incumbent * n_items * RESOLUTION)`, rounding moves the objective by at most
`incumbent / RESOLUTION`, and the scaled bound stays a valid lower bound on the true loss.
Scaling by the largest loss instead would make the sub-1% losses that decide a good plan
round to zero, and CP-SAT would prove optimality of a different problem.

Options whose loss alone exceeds the incumbent cannot be in a better plan and are dropped
before scaling, as are options dominated in every resource.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from .problem import Item, Problem, Solution, Status, merge_ties

__all__ = ["RESOLUTION", "solve_cpsat"]

RESOLUTION = 1e7  # integer units per incumbent objective, per item


def _undominated(item: Item, incumbent: float | None) -> np.ndarray:
    """Options of an item not dominated in (loss, every cost) and not worse than the incumbent.

    Option k dominates j when it is no worse in loss and every cost and strictly better in
    one of them; of exact duplicates the lowest index survives.
    """
    losses, costs = item.losses, item.costs
    lj, lk = losses[:, None], losses[None, :]
    cj, ck = costs[:, None, :], costs[None, :, :]
    no_worse = (lk <= lj) & np.all(ck <= cj, axis=-1)
    strictly = (lk < lj) | np.any(ck < cj, axis=-1)
    idx = np.arange(losses.size)
    dominated = (no_worse & (strictly | (idx[None, :] < idx[:, None]))).any(axis=1)
    keep = ~dominated
    if incumbent is not None:
        keep &= losses <= incumbent
    return np.flatnonzero(keep).astype(np.int64)


def solve_cpsat(
    problem: Problem,
    *,
    time_limit: float = 10.0,
    hint: Sequence[int] | None = None,
    workers: int = 2,
    seed: int = 0,
) -> Solution:
    """Solve exactly with CP-SAT (or to the time limit, reporting the proven gap).

    Args:
        problem: any `Problem`.
        time_limit: wall-clock seconds.
        hint: a feasible assignment used as warm start and as the incumbent that sets the
            integer scale. Without one, the greedy provides it (one resource), or a first
            coarsely scaled CP-SAT pass does (several resources).
        workers: CP-SAT search workers.
        seed: CP-SAT random seed.
    """
    start = time.perf_counter()
    items = merge_ties(problem)
    min_cost = np.sum([it.costs.min(axis=0) for it in items], axis=0)
    if np.any(min_cost > problem.budgets):
        mins = tuple(int(x) for x in min_cost)
        return Solution(
            Status.INFEASIBLE,
            None,
            float("inf"),
            float("inf"),
            mins,
            "cpsat",
            time.perf_counter() - start,
            min_budgets=mins,
        )
    if hint is None or not problem.fits(hint):
        hint = None
        if problem.n_resources == 1:
            from .greedy import solve_greedy

            hint = solve_greedy(problem).choice
        else:
            first = _solve_scaled(problem, items, None, time_limit / 4, workers, seed, start)
            if first.choice is None:
                return first
            hint = first.choice
    return _solve_scaled(
        problem, items, hint, max(0.01, time_limit - (time.perf_counter() - start)), workers, seed, start
    )


def _solve_scaled(
    problem: Problem,
    items: list[Item],
    hint: Sequence[int] | None,
    time_limit: float,
    workers: int,
    seed: int,
    start: float,
) -> Solution:
    """One CP-SAT solve with losses scaled to integers relative to the hint's objective (or,
    without a hint, to the sum of the largest losses: coarse, only to find an incumbent)."""
    from ortools.sat.python import cp_model

    n_res = problem.n_resources
    incumbent = None
    hint_item: list[int] | None = None
    if hint is not None:
        incumbent, _ = problem.evaluate(hint)
        hint_item = [int(hint[it.members[0]]) for it in items]
        if incumbent <= 0:
            _, cost = problem.evaluate(hint)
            return Solution(
                Status.OPTIMAL,
                tuple(hint),
                0.0,
                0.0,
                tuple(int(x) for x in cost),
                "cpsat",
                time.perf_counter() - start,
            )

    allowed = [_undominated(it, incumbent) for it in items]
    if hint_item is not None:  # keep the incumbent's options so the hint stays feasible
        allowed = [a if h in a else np.sort(np.append(a, h)) for a, h in zip(allowed, hint_item, strict=True)]
    reference = incumbent
    if reference is None:
        reference = float(sum(it.losses[a].max() for it, a in zip(items, allowed, strict=True))) or 1.0
    units = len(items) * RESOLUTION  # integer units per `reference` of loss

    # Data -> variables -> constraints -> objective -> solve -> check status.
    model = cp_model.CpModel()
    # x[i][k]: item i takes its option allowed[i][k].
    x = [[model.NewBoolVar(f"x{i}_{j}") for j in a] for i, a in enumerate(allowed)]
    for xi in x:
        model.AddExactlyOne(xi)
    # One knapsack constraint per resource.
    for r in range(n_res):
        terms = [
            int(it.costs[j, r]) * v
            for it, a, xi in zip(items, allowed, x, strict=True)
            for j, v in zip(a, xi, strict=True)
        ]
        model.Add(sum(terms) <= int(problem.budgets[r]))
    # Objective: floor-scaled losses, so `bound / units * reference` is a valid lower bound.
    q = [np.floor(it.losses[a] / reference * units).astype(np.int64) for it, a in zip(items, allowed, strict=True)]
    model.Minimize(sum(int(qv) * v for qi, xi in zip(q, x, strict=True) for qv, v in zip(qi, xi, strict=True)))
    if hint_item is not None:
        for a, xi, h in zip(allowed, x, hint_item, strict=True):
            for j, v in zip(a, xi, strict=True):
                model.AddHint(v, int(j == h))

    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.01, time_limit)
    solver.parameters.num_workers = max(1, workers)
    solver.parameters.random_seed = seed
    code = solver.Solve(model)
    wall = time.perf_counter() - start

    if code == cp_model.INFEASIBLE:
        mins = tuple(int(x) for x in np.sum([it.costs.min(axis=0) for it in items], axis=0))
        return Solution(Status.INFEASIBLE, None, float("inf"), float("inf"), mins, "cpsat", wall, min_budgets=mins)
    if code not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        if hint is not None and incumbent is not None:
            _, cost = problem.evaluate(hint)
            return Solution(Status.TIMEOUT, tuple(hint), incumbent, 0.0, tuple(int(c) for c in cost), "cpsat", wall)
        return Solution(Status.TIMEOUT, None, float("inf"), 0.0, (0,) * n_res, "cpsat", wall)

    item_pos = [
        next(int(j) for j, v in zip(a, xi, strict=True) if solver.Value(v)) for a, xi in zip(allowed, x, strict=True)
    ]
    choice = [0] * problem.n_layers
    for it, j in zip(items, item_pos, strict=True):
        for m in it.members:
            choice[m] = j
    objective, cost = problem.evaluate(choice)
    if hint is not None and incumbent is not None and incumbent < objective:
        choice, objective = list(hint), incumbent  # rounding can make CP-SAT's pick a hair worse
        _, cost = problem.evaluate(choice)
    bound = solver.BestObjectiveBound() / units * reference
    lower = min(bound, incumbent) if incumbent is not None else bound
    lower = min(lower, objective)
    gap = 0.0 if objective <= 0 else (objective - lower) / objective
    status = Status.OPTIMAL if code == cp_model.OPTIMAL else Status.OPTIMAL if gap <= 1e-09 else Status.TIMEOUT
    return Solution(status, tuple(choice), objective, lower, tuple(int(c) for c in cost), "cpsat", wall)
