"""Exact dynamic programming over Pareto states, for one constraint.

Items are added one at a time; a state is a partial plan's (weight, objective). Only states
that no other state beats in both survive (Nemhauser-Ullmann), and a state is dropped as soon
as its objective plus the LP bound of the items still to come (for the weight it has left)
cannot beat the incumbent. After reduced-cost fixing only a few dozen items are left, and this
solves them exactly, with no integer scaling of the objective (unlike CP-SAT).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .hull import lower_hull, pareto_front
from .instance import Instance

__all__ = ["DpResult", "dp_instance"]


@dataclass(frozen=True)
class DpResult:
    """`picks`: a plan better than the incumbent, or None; `proven`: whether that answer is
    exact (False only when the state space outgrew the limit)."""

    picks: np.ndarray | None
    proven: bool


def _lp_completion(inst: Instance, items: list[int]) -> tuple[np.ndarray, np.ndarray, float]:
    """For `items`: the LP bound of their best objective as a function of the weight available,
    as breakpoints `(extra weight, objective)` starting from every item's lightest option."""
    base_w = base_o = 0.0
    dw, do = [], []
    for i in items:
        w, o = inst.rows[i][:, 0], inst.obj[i]
        h = lower_hull(w, o, pareto_front(w, o))
        base_w += w[h[0]]
        base_o += o[h[0]]
        dw.append(np.diff(w[h]))
        do.append(np.diff(o[h]))
    if dw:
        dwa, doa = np.concatenate(dw), np.concatenate(do)
        order = np.argsort(doa / np.where(dwa > 0, dwa, 1.0), kind="stable")
        xs = np.concatenate([[0.0], np.cumsum(dwa[order])])
        ys = np.concatenate([[0.0], np.cumsum(doa[order])])
    else:
        xs, ys = np.zeros(1), np.zeros(1)
    return xs + base_w, ys + base_o, base_w


def dp_instance(inst: Instance, *, incumbent: float = np.inf, max_states: int = 2_000_000) -> DpResult:
    """The optimal plan of a one-constraint instance if it beats `incumbent`.

    Returns picks of a strictly better plan (optimal), or no picks with `proven=True` when no
    plan beats the incumbent (it is optimal) or none fits, or `proven=False` when the state
    space outgrew `max_states`.

    Args:
        inst: an instance with one constraint.
        incumbent: objective of a known plan; states that cannot beat it are pruned.
        max_states: give up beyond this many live states.
    """
    if inst.n_constraints != 1:
        raise ValueError("the DP handles one constraint")
    cap = float(inst.cap[0])
    n = len(inst.items)
    # Items with the widest spread first: the bound prunes best once they are decided.
    spread = [float(o.max() - o.min()) for o in inst.obj]
    order = sorted(range(n), key=lambda i: -spread[i])
    tails = [_lp_completion(inst, order[k + 1 :]) for k in range(n)]
    weight = np.zeros(1)
    value = np.zeros(1)
    parents: list[tuple[np.ndarray, np.ndarray]] = []
    slack = 1e-12 * max(1.0, abs(incumbent)) if np.isfinite(incumbent) else 0.0
    for k, i in enumerate(order):
        w, o = inst.rows[i][:, 0], inst.obj[i]
        new_w = (weight[:, None] + w[None, :]).reshape(-1)
        new_v = (value[:, None] + o[None, :]).reshape(-1)
        parent = np.repeat(np.arange(weight.size), w.size)
        option = np.tile(np.arange(w.size), weight.size)
        keep = new_w <= cap * (1 + 1e-12)
        # Prune states that, completed at the LP bound, still cannot beat the incumbent.
        xs, ys, lightest = tails[k]
        room = cap - new_w
        completion = np.where(room >= lightest - 1e-9, np.interp(np.maximum(room, lightest), xs, ys), np.inf)
        keep &= new_v + completion < incumbent - slack
        new_w, new_v, parent, option = new_w[keep], new_v[keep], parent[keep], option[keep]
        if new_w.size == 0:
            return DpResult(None, True)
        # Pareto filter: by weight, then value; keep strictly improving values.
        idx = np.lexsort((new_v, new_w))
        best = np.minimum.accumulate(new_v[idx])
        improving = np.concatenate([[True], new_v[idx][1:] < best[:-1]])
        idx = idx[improving]
        weight, value = new_w[idx], new_v[idx]
        parents.append((parent[idx], option[idx]))
        if weight.size > max_states:
            return DpResult(None, False)
    state = int(np.argmin(value))
    picks = np.zeros(n, dtype=np.int64)
    for k in range(n - 1, -1, -1):
        parent, option = parents[k]
        picks[order[k]] = option[state]
        state = int(parent[state])
    return DpResult(picks, True)
