"""Convex-hull greedy for one constraint, certified by its LP bound.

On an `Instance` with one constraint (minimise `Σ obj` subject to `Σ w <= cap`): per item, the
options not dominated in (w, obj) are kept and the lower convex hull of them taken. Starting
from every item's lightest option, hull steps are bought in order of objective saved per unit
of weight. The first step that no longer fits, bought fractionally, gives the optimum of the
LP relaxation (Dantzig's bound, a proven lower bound) and the constraint's multiplier `λ`.
The integer answer keeps buying the steps that still fit (fill), moves single items to any
Pareto option that fits, then exchanges pairs: downgrade one item to afford another's upgrade
(swap), for as long as that lowers the objective.

Both questions fit this form: budgeted (obj = loss, w = bytes) and lossless (obj = bytes,
w = loss), so one greedy serves both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .hull import hulls as all_hulls
from .instance import Instance

__all__ = ["GreedyResult", "hull_greedy"]

_TOL = 1e-12


@dataclass(frozen=True)
class GreedyResult:
    """Per-item picks (None if infeasible), the LP lower bound, and the constraint multiplier."""

    picks: np.ndarray | None
    objective: float
    lower_bound: float
    multiplier: float
    minimum_use: float


def hull_greedy(inst: Instance, *, swaps: int = 64) -> GreedyResult:
    """Solve a one-constraint `Instance` greedily (see the module docstring).

    Args:
        inst: an instance with exactly one constraint.
        swaps: at most this many pair exchanges in the final polish.
    """
    if inst.n_constraints != 1:
        raise ValueError("the greedy solver handles one constraint; use cpsat or milp for several budgets")
    cap = float(inst.cap[0])
    w = [r[:, 0] for r in inst.rows]
    obj = inst.obj
    fronts, hulls = all_hulls(w, obj)
    pos = np.array([h[0] for h in hulls], dtype=np.int64)
    used = float(sum(wi[j] for wi, j in zip(w, pos, strict=True)))
    if used > cap * (1 + _TOL) + _TOL * (not inst.integral[0]):
        return GreedyResult(None, float("inf"), float("inf"), 0.0, used)

    # Every hull segment as (item, weight step, objective step); buy by efficiency.
    seg_item, seg_dw, seg_do = [], [], []
    for i, (wi, oi, h) in enumerate(zip(w, obj, hulls, strict=True)):
        if h.size > 1:
            seg_item.append(np.full(h.size - 1, i))
            seg_dw.append(np.diff(wi[h]))
            seg_do.append(np.diff(oi[h]))
    value = float(sum(oi[j] for oi, j in zip(obj, pos, strict=True)))
    lower, multiplier = None, 0.0
    if seg_item:
        s_item = np.concatenate(seg_item)
        s_dw = np.concatenate(seg_dw)
        s_do = np.concatenate(seg_do)
        order = np.lexsort((np.arange(s_dw.size), s_do / s_dw))  # most objective saved per weight first
        step = np.zeros(len(hulls), dtype=np.int64)
        blocked = np.zeros(len(hulls), dtype=bool)
        room = cap - used
        for k in order:
            i = s_item[k]
            if blocked[i]:
                continue
            if s_dw[k] <= room + _TOL * (not inst.integral[0]):
                room -= s_dw[k]
                value += s_do[k]
                step[i] += 1
            else:
                if lower is None:
                    lower = value + s_do[k] * max(room, 0.0) / s_dw[k]
                    multiplier = -s_do[k] / s_dw[k]
                blocked[i] = True
        pos = np.array([h[s] for h, s in zip(hulls, step, strict=True)], dtype=np.int64)
    if lower is None:
        lower = value  # every step fitted: the LP optimum is integral

    pos = _improve(w, obj, fronts, pos, cap, inst.integral[0])
    pos = _swap(w, obj, fronts, pos, cap, swaps, inst.integral[0])
    final = float(sum(oi[j] for oi, j in zip(obj, pos, strict=True)))
    return GreedyResult(pos, final, min(lower, final), multiplier, float(sum(wi.min() for wi in w)))


def _padded_fronts(w, obj, fronts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Front options of every item as padded arrays `(option index, weight, objective)`;
    padding has weight +inf."""
    width = max(f.size for f in fronts)
    opt = np.zeros((len(fronts), width), dtype=np.int64)
    fw = np.full((len(fronts), width), np.inf)
    fo = np.full((len(fronts), width), np.inf)
    for i, (wi, oi, f) in enumerate(zip(w, obj, fronts, strict=True)):
        opt[i, : f.size] = f
        fw[i, : f.size] = wi[f]
        fo[i, : f.size] = oi[f]
    return opt, fw, fo


def _improve(w, obj, fronts, pos, cap, integral) -> np.ndarray:
    """Move single items to any Pareto option that lowers the objective and still fits,
    largest objective saving first."""
    pos = pos.copy()
    opt, fw, fo = _padded_fronts(w, obj, fronts)
    rows = np.arange(len(fronts))
    slack = 0.0 if integral else _TOL * max(cap, 1.0)
    for _ in range(4):
        cw = np.array([wi[j] for wi, j in zip(w, pos, strict=True)])
        co = np.array([oi[j] for oi, j in zip(obj, pos, strict=True)])
        room = cap - cw.sum() + slack
        fits = fw <= (cw + room)[:, None]
        gain = np.where(fits, co[:, None] - fo, -np.inf)
        best = np.argmax(gain, axis=1)
        best_gain = gain[rows, best]
        order = np.argsort(-best_gain, kind="stable")
        changed = False
        for i in order[best_gain[order] > 0]:
            extra = fw[i, best[i]] - cw[i]
            if extra <= room:
                room -= extra
                pos[i] = opt[i, best[i]]
                changed = True
        if not changed:
            break
    return pos


def _swap(w, obj, fronts, pos, cap, rounds, integral) -> np.ndarray:
    """Pair exchanges: downgrade item k (freeing weight) so item i can upgrade, best gain first."""
    pos = pos.copy()
    opt, fw, fo = _padded_fronts(w, obj, fronts)
    slack = 0.0 if integral else _TOL * max(cap, 1.0)
    for _ in range(rounds):
        cw = np.array([wi[j] for wi, j in zip(w, pos, strict=True)])
        co = np.array([oi[j] for oi, j in zip(obj, pos, strict=True)])
        room = cap - cw.sum() + slack
        up_i, up_j = np.nonzero((fo < co[:, None]) & (fw > cw[:, None]) & np.isfinite(fw))
        dn_i, dn_j = np.nonzero(fw < cw[:, None])
        if up_i.size == 0 or dn_i.size == 0:
            break
        need = fw[up_i, up_j] - cw[up_i] - room
        gain = co[up_i] - fo[up_i, up_j]
        free = cw[dn_i] - fw[dn_i, dn_j]
        lost = fo[dn_i, dn_j] - co[dn_i]
        order = np.argsort(free, kind="stable")
        free_sorted, lost_sorted = free[order], lost[order]
        # The cheapest downgrade (least objective lost) among those freeing at least x.
        suffix_best = np.empty(order.size, dtype=np.int64)
        best = order.size - 1
        for k in range(order.size - 1, -1, -1):
            if lost_sorted[k] <= lost_sorted[best]:
                best = k
            suffix_best[k] = best
        first = np.searchsorted(free_sorted, need, side="left")
        ok = first < order.size
        if not ok.any():
            break
        partner = np.full(up_i.size, -1)
        partner[ok] = order[suffix_best[first[ok]]]
        net = np.where(ok, gain - np.where(ok, lost[np.maximum(partner, 0)], 0.0), -np.inf)
        net[ok & (dn_i[np.maximum(partner, 0)] == up_i)] = -np.inf  # an item cannot pay for itself
        u = int(np.argmax(net))
        if net[u] <= 1e-15 * max(1.0, abs(float(co.sum()))):
            break
        d = partner[u]
        pos[up_i[u]] = opt[up_i[u], up_j[u]]
        pos[dn_i[d]] = opt[dn_i[d], dn_j[d]]
    return pos
