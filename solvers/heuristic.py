"""A feasible plan for several constraints: repair, then fill.

Starting from any picks (typically the LP relaxation rounded), *repair* moves items to options
that use less of every violated constraint, losing the least objective per unit relieved, until
all constraints hold; *fill* then buys the moves that lower the objective most per unit of
constraint used, while they fit. Used by `auto` when there are several budgets, where the hull
greedy does not apply.
"""

from __future__ import annotations

import numpy as np

from .instance import Instance

__all__ = ["repair_and_fill"]


def repair_and_fill(inst: Instance, picks: np.ndarray, *, max_moves: int = 100_000) -> np.ndarray | None:
    """A feasible plan near `picks`, or None when repair gets stuck."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # padded options are inf; masked
        return _repair_and_fill(inst, picks, max_moves)


def _repair_and_fill(inst: Instance, picks: np.ndarray, max_moves: int) -> np.ndarray | None:
    obj, rows, valid = inst.padded()
    cap = inst.cap
    scale = 1.0 / np.maximum(cap, 1e-300)
    pos = np.asarray(picks, dtype=np.int64).copy()
    idx = np.arange(len(pos))
    for _ in range(max_moves):
        used = rows[idx, pos].sum(axis=0)
        over = used > cap
        if not over.any():
            break
        delta = rows - rows[idx, pos][:, None, :]  # [n, J, K] change of use
        relief = np.where(over, -delta, 0.0) @ scale * 1.0  # normalised relief of violated rows
        # A move may use more of a constraint that holds, as long as it still holds after.
        harmless = np.all((used + delta)[:, :, ~over] <= cap[~over], axis=-1)
        cost = np.maximum(obj - obj[idx, pos][:, None], 0.0)
        score = np.where(valid & harmless & (relief > 0), cost / np.maximum(relief, 1e-300), np.inf)
        flat = int(np.argmin(score))
        if not np.isfinite(score.flat[flat]):
            return None
        i, j = divmod(flat, score.shape[1])
        pos[i] = j
    else:
        return None
    for _ in range(max_moves):
        used = rows[idx, pos].sum(axis=0)
        delta = rows - rows[idx, pos][:, None, :]
        fits = np.all(used + delta <= cap, axis=-1) & valid
        gain = obj[idx, pos][:, None] - obj
        spend = np.maximum(delta, 0.0) @ scale + 1e-300
        score = np.where(fits & (gain > 0), gain / spend, -np.inf)
        flat = int(np.argmax(score))
        if not np.isfinite(score.flat[flat]) or score.flat[flat] <= 0:
            break
        i, j = divmod(flat, score.shape[1])
        pos[i] = j
    return pos if inst.feasible(pos) else None
