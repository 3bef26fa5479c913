"""HiGHS: the exact MILP (boolean variables, through cvxpy) and its LP relaxation (direct).

The LP relaxation of the multiple-choice knapsack is the *continuous-modification* bound: what
could be reached if every layer could mix options in any proportion. Its constraint duals are
the Lagrangian multipliers that `lagrange.reduce_instance` uses.

Both are normalised before they reach the solver: the objective by a reference value (the
incumbent's, else the largest possible), each constraint by its right-hand side, so every
coefficient is of order one. Tiny objectives would otherwise fall below HiGHS's tolerances and
come back "optimal" and wrong. Right-hand sides are not tightened (that would make the bounds
invalid); a plan HiGHS accepts within its tolerance is checked in exact arithmetic by the
caller and repaired if it overshoots.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .instance import Instance

__all__ = ["LinearResult", "linear_instance", "lp_relaxation"]


@dataclass(frozen=True)
class LinearResult:
    """`values`: per item, the solver's option weights (0/1 for the MILP); `lower_bound`: the
    proven bound (the LP value, or HiGHS's MIP dual bound); `multipliers`: LP duals per
    constraint, in the instance's units (None for the MILP)."""

    values: list[np.ndarray] | None
    lower_bound: float
    status: str
    multipliers: np.ndarray | None


def lp_relaxation(inst: Instance, *, time_limit: float = 10.0, reference: float | None = None) -> LinearResult:
    """The LP relaxation of `inst`, passed to HiGHS directly (building it through cvxpy costs
    more than solving it), with its constraint multipliers."""
    import highspy

    sizes = [o.size for o in inst.obj]
    n_items, k = len(sizes), inst.n_constraints
    n = int(np.sum(sizes))
    ref = reference if reference and reference > 0 else float(np.sum([o.max() for o in inst.obj])) or 1.0
    scale = 1.0 / np.maximum(inst.cap, 1e-300)
    item = np.repeat(np.arange(n_items), sizes)
    with np.errstate(over="ignore", invalid="ignore"):  # a zero right-hand side: infeasible, HiGHS says so
        rows = np.concatenate(inst.rows, axis=0) * scale if k else np.zeros((n, 0))  # [n, K]
    # Column j: a 1 in its item's row, then its normalised use of every constraint.
    index = np.column_stack([item, np.tile(np.arange(k) + n_items, (n, 1))]) if k else item[:, None]
    value = np.column_stack([np.ones(n), rows]) if k else np.ones((n, 1))
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = n, n_items + k
    lp.col_cost_ = np.concatenate(inst.obj) / ref
    lp.col_lower_, lp.col_upper_ = np.zeros(n), np.ones(n)
    lp.row_lower_ = np.concatenate([np.ones(n_items), np.full(k, -highspy.kHighsInf)])
    lp.row_upper_ = np.concatenate([np.ones(n_items), np.ones(k)])
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.arange(0, n * (k + 1) + 1, k + 1, dtype=np.int32)
    lp.a_matrix_.index_ = index.reshape(-1).astype(np.int32)
    lp.a_matrix_.value_ = value.reshape(-1).astype(np.float64)
    with _quiet_stdout():
        h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", float(time_limit))
    h.passModel(lp)
    h.run()
    status = h.getModelStatus()
    if status == highspy.HighsModelStatus.kInfeasible:
        return LinearResult(None, float("inf"), "infeasible", None)
    if status != highspy.HighsModelStatus.kOptimal:
        return LinearResult(None, float("-inf"), h.modelStatusToString(status), None)
    sol = h.getSolution()
    x = np.clip(np.asarray(sol.col_value), 0.0, 1.0)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    values = [x[offsets[i] : offsets[i + 1]] for i in range(n_items)]
    duals = np.asarray(sol.row_dual)[n_items:]
    multipliers = np.maximum(-duals, 0.0) * ref * scale  # a <= row's dual is <= 0 when minimising
    return LinearResult(values, float(h.getInfo().objective_function_value) * ref, "optimal", multipliers)


def linear_instance(
    inst: Instance, *, integer: bool, time_limit: float = 10.0, reference: float | None = None, gap: float = 1e-9
) -> LinearResult:
    """Solve the MILP (`integer=True`, cvxpy boolean variables on HiGHS) or the LP relaxation
    (`lp_relaxation`) of `inst`."""
    if not integer:
        return lp_relaxation(inst, time_limit=time_limit, reference=reference)
    import cvxpy as cp
    import scipy.sparse as sp

    sizes = [o.size for o in inst.obj]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n = int(offsets[-1])
    obj = np.concatenate(inst.obj)
    ref = reference if reference and reference > 0 else float(np.sum([o.max() for o in inst.obj])) or 1.0
    one_each = sp.csr_matrix(
        (np.ones(n), (np.repeat(np.arange(len(sizes)), sizes), np.arange(n))), shape=(len(sizes), n)
    )
    x = cp.Variable(n, boolean=integer)
    constraints = [one_each @ x == 1]
    if not integer:
        constraints += [x >= 0, x <= 1]
    budget = None
    if inst.n_constraints:
        rows = np.concatenate(inst.rows, axis=0).T  # [K, n]
        scale = 1.0 / np.maximum(inst.cap, 1e-300)
        budget = (rows * scale[:, None]) @ x <= 1.0
        constraints.append(budget)
    problem = cp.Problem(cp.Minimize((obj / ref) @ x), constraints)
    opts = {"time_limit": float(time_limit), "output_flag": False, "log_to_console": False}
    if integer:
        opts["mip_rel_gap"] = gap
    try:
        with _quiet_stdout():  # HiGHS prints a banner from C code even with output off
            problem.solve(solver=cp.HIGHS, **opts)
    except cp.error.SolverError as e:
        return LinearResult(None, float("-inf"), f"error: {e}", None)
    status = problem.status
    if status in ("infeasible", "infeasible_inaccurate"):
        return LinearResult(None, float("inf"), "infeasible", None)
    if x.value is None:
        return LinearResult(None, float("-inf"), status, None)
    values = [np.clip(x.value[offsets[i] : offsets[i + 1]], 0.0, 1.0) for i in range(len(sizes))]
    if integer:
        info = problem.solver_stats.extra_stats
        dual = getattr(info, "mip_dual_bound", None)
        bound = float(dual) * ref if dual is not None and np.isfinite(dual) else float("-inf")
        return LinearResult(values, bound, status, None)
    multipliers = None
    if budget is not None and budget.dual_value is not None:
        multipliers = np.maximum(np.asarray(budget.dual_value, dtype=np.float64), 0.0) * ref * scale
    return LinearResult(values, float(problem.value) * ref, status, multipliers)


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence file descriptor 1 (C-level prints) for the duration."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # no real stdout (e.g. captured): nothing to silence
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
