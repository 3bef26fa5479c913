"""One entry point over the backends: `solve(problem, method=...)`.

| method       | what it does                                                                    |
|--------------|---------------------------------------------------------------------------------|
| `greedy`     | hull greedy with fill and swap polish, certified by the LP bound (one budget)   |
| `cpsat`      | OR-Tools CP-SAT, exact (any number of budgets), warm-started                     |
| `milp`       | cvxpy MILP on HiGHS, exact to HiGHS's gap                                       |
| `lp`         | the LP relaxation (the continuous bound), rounded and repaired to a plan        |
| `exhaustive` | every plan (tiny problems)                                                      |
| `auto`       | greedy (or LP + rounding with several budgets) → reduced-cost fixing with the   |
|              | LP multipliers → exact DP (one budget) or CP-SAT on the few layers left         |
"""

from __future__ import annotations

import itertools
import time
from typing import Literal

import numpy as np

from .cpsat import cpsat_instance
from .dp import dp_instance
from .exhaustive import exhaustive_instance
from .greedy import hull_greedy
from .heuristic import repair_and_fill, swap_polish
from .instance import Instance, build_instance
from .lagrange import reduce_instance
from .milp import linear_instance, lp_relaxation
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
    lp = lp_relaxation(inst, time_limit=time_limit)
    return None if lp.values is None else _round_lp(inst, lp.values, lp.multipliers)


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
    res = lp_relaxation(inst, time_limit=time_limit)
    if res.values is None:
        return None, res.lower_bound, Status.INFEASIBLE if res.status == "infeasible" else Status.TIMEOUT
    picks = _round_lp(inst, res.values, res.multipliers)
    if picks is None and inst.n_constraints == 1:
        picks = hull_greedy(inst).picks
    if picks is None:  # the rounding could not be repaired: ask CP-SAT for any plan
        found = cpsat_instance(inst, time_limit=time_limit, workers=workers)
        if found.picks is None:
            return None, res.lower_bound, Status.TIMEOUT if found.timed_out else Status.INFEASIBLE
        picks = found.picks
    return picks, res.lower_bound, Status.FEASIBLE


def _surrogate_greedy(inst: Instance, multipliers: np.ndarray | None) -> np.ndarray | None:
    """Hull greedy on one surrogate constraint, the constraints weighted by their LP multipliers
    (each normalised by its right-hand side when none binds); its plan may break a single
    constraint, which repair then fixes."""
    lam = np.zeros(inst.n_constraints) if multipliers is None else np.asarray(multipliers, dtype=np.float64)
    if not np.any(lam > 0):
        lam = 1.0 / np.maximum(inst.cap, 1e-300)
    lam = lam / lam.max()
    surrogate = Instance(
        items=inst.items,
        obj=inst.obj,
        rows=[(r @ lam)[:, None] for r in inst.rows],
        cap=np.array([float(lam @ inst.cap)]),
        integral=np.array([False]),
        lossless=inst.lossless,
    )
    return hull_greedy(surrogate).picks


def _round_lp(inst: Instance, values: list[np.ndarray], multipliers: np.ndarray | None = None) -> np.ndarray | None:
    """The best plan among repaired, filled and swap-polished candidates: every option
    combination of the LP solution's (few) fractional items, and the surrogate greedy's plan."""
    base = np.array([int(np.argmax(v)) for v in values])
    fractional = [i for i, v in enumerate(values) if v.max() < 1 - 1e-7]
    choices = [np.flatnonzero(values[i] > 1e-7) for i in fractional]
    starts = []
    for combo in itertools.islice(itertools.product(*choices), 64) if fractional else [()]:
        picks = base.copy()
        for i, j in zip(fractional, combo, strict=True):
            picks[i] = j
        starts.append(picks)
    surrogate = _surrogate_greedy(inst, multipliers)
    if surrogate is not None:
        starts.append(surrogate)
    best, best_value = None, np.inf
    for start in starts:
        picks = repair_and_fill(inst, start)
        if picks is None:
            continue
        picks = swap_polish(inst, picks)
        value = inst.totals(picks)[0]
        if value < best_value:
            best, best_value = picks, value
    return best


def _auto(inst: Instance, gap: float, time_limit: float, workers: int) -> tuple[np.ndarray | None, float, Status, str]:
    start = time.perf_counter()
    if inst.n_constraints == 1:
        g = hull_greedy(inst)
        if g.picks is None:
            return None, float("inf"), Status.INFEASIBLE, "greedy"
        picks, lower, multipliers, name = g.picks, g.lower_bound, np.array([g.multiplier]), "greedy"
    else:
        lp = lp_relaxation(inst, time_limit=time_limit)
        if lp.values is None:
            return None, lp.lower_bound, Status.INFEASIBLE if lp.status == "infeasible" else Status.TIMEOUT, "lp"
        picks = _round_lp(inst, lp.values, lp.multipliers)
        lower, multipliers, name = lp.lower_bound, lp.multipliers, "lp+rounding"
        if picks is None:  # no rounding fits: let CP-SAT find a first plan
            res = cpsat_instance(inst, time_limit=time_limit, workers=workers)
            if res.picks is None:
                return None, lower, Status.TIMEOUT if res.timed_out else Status.INFEASIBLE, "cpsat"
            picks, lower, name = res.picks, max(lower, res.lower_bound), "cpsat"
    value = inst.totals(picks)[0]
    if _gap(value, lower) <= gap or multipliers is None:
        return picks, lower, Status.FEASIBLE, name

    # Reduced-cost fixing with the LP multipliers leaves few layers undecided: solve those exactly.
    red = reduce_instance(inst, multipliers, value, picks)
    lower = max(lower, red.bound)
    if not red.core:
        return picks, value, Status.FEASIBLE, name + "+fixing"  # only the incumbent survives: optimal
    if _gap(value, lower) <= gap:
        return picks, lower, Status.FEASIBLE, name + "+fixing"
    sub = inst.restrict(red.core, red.keep, red.fixed)
    hint = np.array([int(np.flatnonzero(kept == picks[i])[0]) for i, kept in zip(red.core, red.keep, strict=True)])
    fixed_value = sum(inst.obj[i][j] for i, j in red.fixed.items())
    core_value = value - fixed_value
    label = f"{len(red.core)} of {len(inst.items)} layers"
    found, core_lower, timed_out = None, -np.inf, False
    if sub.n_constraints == 1:
        dp = dp_instance(sub, incumbent=core_value)
        if dp.proven:
            found, core_lower, name = (
                dp.picks,
                core_value if dp.picks is None else sub.totals(dp.picks)[0],
                f"{name}+fixing+dp({label})",
            )
    if core_lower == -np.inf:  # several constraints, or the DP gave up: CP-SAT on the core
        left = max(0.05, time_limit - (time.perf_counter() - start))
        res = cpsat_instance(sub, time_limit=left, hint=hint, workers=workers, gap=gap / 2)
        found, core_lower, timed_out = res.picks, res.lower_bound, res.timed_out
        name = f"{name}+fixing+cpsat({label})"
    if found is not None:
        candidate = picks.copy()
        for i, kept, j in zip(red.core, red.keep, found, strict=True):
            candidate[i] = kept[j]
        if inst.feasible(candidate) and inst.totals(candidate)[0] < value:
            picks, value = candidate, inst.totals(candidate)[0]
    # Any plan better than the incumbent uses the fixed options, so it costs at least this:
    lower = max(lower, min(value, fixed_value + core_lower))
    return picks, lower, Status.TIMEOUT if timed_out and _gap(value, lower) > gap else Status.FEASIBLE, name
