"""One entry point over the backends: `solve(problem, method=...)`."""

from __future__ import annotations

import time
from typing import Literal

from .cpsat import solve_cpsat
from .exhaustive import solve_exhaustive
from .greedy import solve_greedy
from .problem import Problem, Solution, Status, merge_ties

__all__ = ["METHODS", "Method", "solve"]

Method = Literal["auto", "greedy", "cpsat", "exhaustive"]
METHODS: tuple[str, ...] = ("auto", "greedy", "cpsat", "exhaustive")

# `auto` hands a problem to CP-SAT when the greedy's gap is above `gap` and the problem has
# at most this many (item, option) pairs.
EXACT_SIZE_LIMIT = 200_000


def solve(
    problem: Problem,
    *,
    method: Method = "auto",
    gap: float = 1e-6,
    time_limit: float = 10.0,
    workers: int = 2,
) -> Solution:
    """Pick one option per layer minimising the summed loss within every budget.

    Args:
        problem: the instance.
        method: `greedy` (one resource; hull greedy with LP bound), `cpsat` (exact, any number
            of resources), `exhaustive` (tiny problems), or `auto`: greedy first, then CP-SAT
            when the proven gap exceeds `gap` (or there are several resources), keeping the better.
        gap: relative gap `auto` accepts without an exact solve.
        time_limit: seconds for an exact solve.
        workers: CP-SAT search workers.

    Returns:
        A `Solution`; check `status` before using `choice`.
    """
    if method == "greedy":
        return solve_greedy(problem)
    if method == "cpsat":
        return solve_cpsat(problem, time_limit=time_limit, workers=workers)
    if method == "exhaustive":
        return solve_exhaustive(problem)
    if method != "auto":
        raise ValueError(f"unknown solver {method!r}; choose one of {', '.join(METHODS)}")

    start = time.perf_counter()
    if problem.n_resources > 1:
        return solve_cpsat(problem, time_limit=time_limit, workers=workers)
    g = solve_greedy(problem, tolerance=gap)
    if g.status is not Status.FEASIBLE:
        return g
    size = sum(it.losses.size for it in merge_ties(problem))
    if size > EXACT_SIZE_LIMIT:
        return g
    c = solve_cpsat(problem, time_limit=time_limit, hint=g.choice, workers=workers)
    lower = max(g.lower_bound, c.lower_bound if c.choice is not None else g.lower_bound)
    best = c if c.choice is not None and c.objective < g.objective else g
    lower = min(lower, best.objective)
    rel = 0.0 if best.objective <= 0 else (best.objective - lower) / best.objective
    if rel <= gap:
        status = Status.OPTIMAL
    elif c.status is Status.TIMEOUT:
        status = Status.TIMEOUT
    else:
        status = Status.FEASIBLE
    return Solution(
        status=status,
        choice=best.choice,
        objective=best.objective,
        lower_bound=lower,
        cost=best.cost,
        solver=f"greedy+cpsat ({best.solver} plan)",
        wall_s=time.perf_counter() - start,
    )
