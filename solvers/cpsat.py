"""Exact solver: OR-Tools CP-SAT on an `Instance`, any number of constraints, both questions.

CP-SAT needs integer coefficients.

- Float objectives (losses) are scaled *relative to the objective being optimised* (the
  incumbent's), not to the largest value: with `q = floor(obj / incumbent * n_items * RESOLUTION)`
  rounding moves the objective by at most `incumbent / RESOLUTION`, and the scaled bound stays a
  valid lower bound. Scaling by the largest loss instead would make the sub-1% losses that decide
  a good plan round to zero, and CP-SAT would prove optimality of a different problem.
- Float constraint rows (the loss cap of a lossless question) are rounded down in a *relaxed*
  model (every truly feasible plan stays feasible, so its bound is valid, and its optimum, if it
  truly fits, is the optimum) and up in a *conservative* one (every plan it finds truly fits),
  which is solved only when the relaxed optimum breaks the cap by a rounding hair.
- Integer rows (bytes, BOPs) are exact.

Options whose objective alone exceeds the incumbent cannot be in a better plan and are dropped,
as are options dominated in the objective and every constraint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .instance import Instance

__all__ = ["RESOLUTION", "CpsatResult", "cpsat_instance"]

RESOLUTION = 1e7  # integer units per incumbent objective, per item


@dataclass(frozen=True)
class CpsatResult:
    picks: np.ndarray | None
    lower_bound: float
    optimal: bool
    timed_out: bool


def _undominated(obj: np.ndarray, rows: np.ndarray, limit: float | None) -> np.ndarray:
    """Options not dominated in (objective, every row), and not above `limit`.

    Option k dominates j when it is no worse everywhere and strictly better somewhere; of
    exact duplicates the lowest index survives.
    """
    oj, ok = obj[:, None], obj[None, :]
    rj, rk = rows[:, None, :], rows[None, :, :]
    no_worse = (ok <= oj) & np.all(rk <= rj, axis=-1)
    strictly = (ok < oj) | np.any(rk < rj, axis=-1)
    idx = np.arange(obj.size)
    dominated = (no_worse & (strictly | (idx[None, :] < idx[:, None]))).any(axis=1)
    keep = ~dominated
    if limit is not None:
        keep &= obj <= limit
    return np.flatnonzero(keep)


def cpsat_instance(
    inst: Instance,
    *,
    time_limit: float = 10.0,
    hint: np.ndarray | None = None,
    workers: int = 2,
    seed: int = 0,
    gap: float = 0.0,
) -> CpsatResult:
    """Solve `inst` with CP-SAT (see the module docstring).

    Args:
        inst: the instance.
        time_limit: seconds.
        hint: per-item picks of a feasible plan: warm start, and the incumbent setting the scale.
        workers: CP-SAT search workers (the search is interleaved, so results are reproducible).
        seed: CP-SAT random seed.
        gap: stop once the proven relative gap is at most this (0: prove optimality).
    """
    start = time.perf_counter()
    relaxed = _solve(inst, hint, time_limit, workers, seed, round_up=False, gap=gap)
    if relaxed.picks is None or inst.feasible(relaxed.picks) or np.all(inst.integral):
        return relaxed
    # The relaxed optimum breaks the loss cap by a rounding hair: find a plan that surely fits.
    left = max(0.01, time_limit - (time.perf_counter() - start))
    safe = _solve(inst, hint, left, workers, seed, round_up=True, gap=gap)
    return CpsatResult(safe.picks, relaxed.lower_bound, False, safe.timed_out)


def _solve(
    inst: Instance, hint: np.ndarray | None, time_limit: float, workers: int, seed: int, *, round_up: bool, gap: float
) -> CpsatResult:
    from ortools.sat.python import cp_model

    n_items = len(inst.items)
    incumbent = None
    if hint is not None and inst.feasible(hint):
        incumbent, _ = inst.totals(hint)
        if incumbent <= 0:
            return CpsatResult(np.asarray(hint), 0.0, True, False)
    allowed = [_undominated(o, r, incumbent) for o, r in zip(inst.obj, inst.rows, strict=True)]
    if incumbent is not None:  # keep the incumbent's options so the hint stays feasible
        allowed = [a if h in a else np.sort(np.append(a, h)) for a, h in zip(allowed, hint, strict=True)]
    if any(a.size == 0 for a in allowed):
        return CpsatResult(None, float("inf"), True, False)

    integral_obj = inst.lossless
    units = n_items * RESOLUTION
    reference = 1.0
    if not integral_obj:
        reference = (
            incumbent
            if incumbent is not None
            else float(sum(o[a].max() for o, a in zip(inst.obj, allowed, strict=True)))
        )
        reference = reference or 1.0

    # Data -> variables -> constraints -> objective -> solve -> check status.
    model = cp_model.CpModel()
    # x[i][k]: item i takes its option allowed[i][k].
    x = [[model.NewBoolVar(f"x{i}_{j}") for j in a] for i, a in enumerate(allowed)]
    for xi in x:
        model.AddExactlyOne(xi)
    # One constraint per row: exact integers, or a loss cap scaled to integers.
    for k in range(inst.n_constraints):
        if inst.integral[k]:
            coef = [r[a, k].astype(np.int64) for r, a in zip(inst.rows, allowed, strict=True)]
            rhs = int(inst.cap[k])
        else:
            scale = units / max(inst.cap[k], 1e-300)
            rnd = np.ceil if round_up else np.floor
            coef = [rnd(r[a, k] * scale).astype(np.int64) for r, a in zip(inst.rows, allowed, strict=True)]
            rhs = int(np.floor(inst.cap[k] * scale))
        model.Add(sum(int(c) * v for ci, xi in zip(coef, x, strict=True) for c, v in zip(ci, xi, strict=True)) <= rhs)
    # Objective: exact integer costs, or losses floor-scaled so the bound stays valid.
    if integral_obj:
        q = [o[a].astype(np.int64) for o, a in zip(inst.obj, allowed, strict=True)]
    else:
        q = [np.floor(o[a] / reference * units).astype(np.int64) for o, a in zip(inst.obj, allowed, strict=True)]
    model.Minimize(sum(int(c) * v for qi, xi in zip(q, x, strict=True) for c, v in zip(qi, xi, strict=True)))
    if hint is not None:
        for a, xi, h in zip(allowed, x, hint, strict=True):
            for j, v in zip(a, xi, strict=True):
                model.AddHint(v, int(j == h))

    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.01, time_limit)
    solver.parameters.num_workers = max(1, workers)
    solver.parameters.interleave_search = workers > 1  # reproducible with several workers
    solver.parameters.random_seed = seed
    solver.parameters.relative_gap_limit = gap
    code = solver.Solve(model)

    if code == cp_model.INFEASIBLE:
        return CpsatResult(None, float("inf"), True, False)
    if code not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return CpsatResult(None, float("-inf"), False, True)
    picks = np.array(
        [next(int(j) for j, v in zip(a, xi, strict=True) if solver.Value(v)) for a, xi in zip(allowed, x, strict=True)]
    )
    bound = solver.BestObjectiveBound()
    bound = bound if integral_obj else bound / units * reference
    if incumbent is not None:
        bound = min(bound, incumbent)
        value, _ = inst.totals(picks)
        if value > incumbent:  # rounding can make CP-SAT's pick a hair worse than the hint
            picks = np.asarray(hint)
    if round_up:
        bound = float("-inf")  # the conservative model's bound says nothing about the true problem
    stopped_early = code != cp_model.OPTIMAL and gap > 0 and value_gap(inst, picks, bound) <= gap
    return CpsatResult(
        picks, float(bound), code == cp_model.OPTIMAL and not round_up, code != cp_model.OPTIMAL and not stopped_early
    )


def value_gap(inst: Instance, picks: np.ndarray, bound: float) -> float:
    value, _ = inst.totals(picks)
    return 0.0 if value <= 0 else (value - bound) / value
