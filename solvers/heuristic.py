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

__all__ = ["repair_and_fill", "swap_polish"]


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


def swap_polish(inst: Instance, picks: np.ndarray, *, rounds: int = 32, width: int = 256) -> np.ndarray:
    """Pair exchanges under several constraints: move item i to a better option and item k to
    one that makes room for it, best net gain first. Candidates are the `width` largest
    upgrades and the `width` downgrades that free the most per objective lost."""
    obj, rows, valid = inst.padded()
    idx = np.arange(len(picks))
    scale = 1.0 / np.maximum(inst.cap, 1e-300)
    pos = np.asarray(picks, dtype=np.int64).copy()
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for _ in range(rounds):
            used = rows[idx, pos].sum(axis=0)
            cur_o, cur_r = obj[idx, pos], rows[idx, pos]
            gain = np.where(valid, cur_o[:, None] - obj, -np.inf)
            up_i, up_j = np.nonzero(gain > 0)
            delta = rows - cur_r[:, None, :]
            freed = np.where(valid, -(np.minimum(delta, 0.0) @ scale), 0.0)
            lost = np.where(valid, obj - cur_o[:, None], np.inf)
            dn_i, dn_j = np.nonzero(freed > 0)
            if up_i.size == 0 or dn_i.size == 0:
                break
            top_up = np.argsort(-gain[up_i, up_j], kind="stable")[:width]
            top_dn = np.argsort(lost[dn_i, dn_j] / freed[dn_i, dn_j], kind="stable")[:width]
            ui, uj = up_i[top_up], up_j[top_up]
            di, dj = dn_i[top_dn], dn_j[top_dn]
            total = used + delta[ui, uj][:, None, :] + delta[di, dj][None, :, :]  # [U, D, K]
            ok = np.all(total <= inst.cap, axis=-1) & (ui[:, None] != di[None, :])
            net = np.where(ok, gain[ui, uj][:, None] - lost[di, dj][None, :], -np.inf)
            best = np.unravel_index(int(np.argmax(net)), net.shape)
            if not np.isfinite(net[best]) or net[best] <= 1e-15 * max(1.0, abs(float(cur_o.sum()))):
                break
            pos[ui[best[0]]] = uj[best[0]]
            pos[di[best[1]]] = dj[best[1]]
    return pos
