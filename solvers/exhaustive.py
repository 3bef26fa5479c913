"""Brute-force reference: try every assignment. For tests and tiny problems only."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np

from .problem import Problem, Solution, Status, merge_ties

__all__ = ["MAX_ASSIGNMENTS", "solve_exhaustive"]

MAX_ASSIGNMENTS = 2_000_000


def solve_exhaustive(problem: Problem) -> Solution:
    """Enumerate all assignments (tie groups merged) and return the best that fits.

    Raises:
        ValueError: more than `MAX_ASSIGNMENTS` assignments.
    """
    start = time.perf_counter()
    items = merge_ties(problem)
    count = math.prod(it.losses.size for it in items)
    if count > MAX_ASSIGNMENTS:
        raise ValueError(f"{count} assignments are too many to enumerate (limit {MAX_ASSIGNMENTS})")
    best, best_loss = None, math.inf
    for combo in itertools.product(*(range(it.losses.size) for it in items)):
        cost = np.sum([it.costs[j] for it, j in zip(items, combo, strict=True)], axis=0)
        if np.any(cost > problem.budgets):
            continue
        loss = sum(float(it.losses[j]) for it, j in zip(items, combo, strict=True))
        if loss < best_loss:
            best, best_loss = combo, loss
    wall = time.perf_counter() - start
    if best is None:
        min_cost = np.sum([it.costs.min(axis=0) for it in items], axis=0)
        mins = tuple(int(x) for x in min_cost)
        return Solution(Status.INFEASIBLE, None, math.inf, math.inf, mins, "exhaustive", wall, min_budgets=mins)
    choice = [0] * problem.n_layers
    for it, j in zip(items, best, strict=True):
        for m in it.members:
            choice[m] = int(j)
    objective, cost = problem.evaluate(choice)
    return Solution(
        Status.OPTIMAL, tuple(choice), objective, objective, tuple(int(c) for c in cost), "exhaustive", wall
    )
