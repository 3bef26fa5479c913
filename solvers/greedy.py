"""Convex-hull greedy for the one-resource multiple-choice knapsack, certified by its LP bound.

Per item, options dominated in (cost, loss) are removed and the lower convex hull of the rest
is taken. Starting from every item's cheapest option, hull upgrades are bought in order of
loss saved per unit of cost. The first upgrade that no longer fits, bought fractionally, gives
the optimum of the LP relaxation (a proven lower bound on the optimal loss); the integer
answer keeps filling with the upgrades that still fit, then improves item by item with any
non-hull option that fits. The returned gap is measured against that LP bound.
"""

from __future__ import annotations

import time

import numpy as np

from .problem import Item, Problem, Solution, Status, merge_ties

__all__ = ["lower_hull", "pareto_front", "solve_greedy"]


def pareto_front(costs: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Indices of the options not dominated in (cost, loss), by increasing cost.

    An option is dominated when another costs no more and loses strictly less, or costs
    strictly less and loses no more. Among exact duplicates the lowest index is kept.
    """
    order = np.lexsort((np.arange(costs.size), losses, costs))
    keep, best = [], np.inf
    for j in order:
        if losses[j] < best:
            keep.append(j)
            best = losses[j]
    return np.asarray(keep, dtype=np.int64)


def lower_hull(costs: np.ndarray, losses: np.ndarray, front: np.ndarray) -> np.ndarray:
    """Subset of the Pareto `front` (by increasing cost) on its lower convex hull."""
    hull: list[int] = []
    for j in front:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the segment a -> j: drop it.
            cross = (costs[b] - costs[a]) * (losses[j] - losses[a]) - (losses[b] - losses[a]) * (costs[j] - costs[a])
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(int(j))
    return np.asarray(hull, dtype=np.int64)


def solve_greedy(problem: Problem, *, tolerance: float = 1e-9) -> Solution:
    """Solve a one-resource problem by hull greedy; the result carries the LP lower bound.

    Args:
        problem: a `Problem` with exactly one resource.
        tolerance: relative gap under which the answer is reported OPTIMAL.

    Example:
        >>> import numpy as np
        >>> p = Problem(losses=[np.array([4.0, 1.0, 0.0])] * 2,
        ...             costs=[np.array([[1], [2], [4]])] * 2, budgets=np.array([5]))
        >>> s = solve_greedy(p)
        >>> s.choice, s.objective, s.status.value
        ((1, 1), 2.0, 'optimal')
    """
    if problem.n_resources != 1:
        raise ValueError("the greedy solver handles one resource; use cpsat or milp for several budgets")
    start = time.perf_counter()
    items = merge_ties(problem)
    budget = int(problem.budgets[0])

    cost_of = [it.costs[:, 0] for it in items]
    fronts = [pareto_front(c, it.losses) for c, it in zip(cost_of, items, strict=True)]
    hulls = [lower_hull(c, it.losses, f) for c, it, f in zip(cost_of, items, fronts, strict=True)]
    pos = np.array([h[0] for h in hulls], dtype=np.int64)  # current option of each item
    spent = int(sum(int(c[j]) for c, j in zip(cost_of, pos, strict=True)))
    if spent > budget:
        return Solution(
            status=Status.INFEASIBLE,
            choice=None,
            objective=float("inf"),
            lower_bound=float("inf"),
            cost=(spent,),
            solver="greedy",
            wall_s=time.perf_counter() - start,
            min_budgets=(spent,),
        )

    # Every hull segment as (efficiency, item, step, delta cost, delta loss).
    seg_item, seg_dc, seg_dl = [], [], []
    for i, (c, it, h) in enumerate(zip(cost_of, items, hulls, strict=True)):
        if h.size > 1:
            seg_item.append(np.full(h.size - 1, i))
            seg_dc.append(np.diff(c[h]))
            seg_dl.append(np.diff(it.losses[h]))
    loss = float(sum(it.losses[j] for it, j in zip(items, pos, strict=True)))
    lp_bound = None
    if seg_item:
        s_item = np.concatenate(seg_item)
        s_dc = np.concatenate(seg_dc).astype(np.int64)
        s_dl = np.concatenate(seg_dl)
        eff = -s_dl / s_dc
        order = np.lexsort((np.arange(eff.size), -eff))
        step = np.zeros(len(items), dtype=np.int64)  # hull index reached per item
        blocked = np.zeros(len(items), dtype=bool)
        remaining = budget - spent
        for k in order:
            i = s_item[k]
            if blocked[i]:
                continue
            dc = int(s_dc[k])
            if dc <= remaining:
                remaining -= dc
                loss += float(s_dl[k])
                step[i] += 1
            else:
                if lp_bound is None:
                    lp_bound = loss + float(s_dl[k]) * remaining / dc
                blocked[i] = True
        pos = np.array([h[s] for h, s in zip(hulls, step, strict=True)], dtype=np.int64)
        spent = budget - remaining
    if lp_bound is None:
        lp_bound = loss  # every upgrade fitted: the LP optimum is integral

    pos, spent = _improve(items, cost_of, fronts, pos, spent, budget)
    choice = _expand(problem, items, pos)
    objective, cost = problem.evaluate(choice)
    lower = min(lp_bound, objective)
    gap = 0.0 if objective <= 0 else (objective - lower) / objective
    return Solution(
        status=Status.OPTIMAL if gap <= tolerance else Status.FEASIBLE,
        choice=choice,
        objective=objective,
        lower_bound=lower,
        cost=tuple(int(x) for x in cost),
        solver="greedy",
        wall_s=time.perf_counter() - start,
    )


def _improve(
    items: list[Item],
    cost_of: list[np.ndarray],
    fronts: list[np.ndarray],
    pos: np.ndarray,
    spent: int,
    budget: int,
    max_passes: int = 4,
) -> tuple[np.ndarray, int]:
    """Move single items to any Pareto option that lowers the loss and still fits."""
    pos = pos.copy()
    for _ in range(max_passes):
        changed = False
        for i, (c, it, f) in enumerate(zip(cost_of, items, fronts, strict=True)):
            room = budget - spent + int(c[pos[i]])
            fits = f[c[f] <= room]
            if fits.size == 0:
                continue
            best = fits[np.argmin(it.losses[fits])]
            if it.losses[best] < it.losses[pos[i]]:
                spent += int(c[best]) - int(c[pos[i]])
                pos[i] = best
                changed = True
        if not changed:
            break
    return pos, spent


def _expand(problem: Problem, items: list[Item], pos: np.ndarray) -> tuple[int, ...]:
    choice = [0] * problem.n_layers
    for it, j in zip(items, pos, strict=True):
        for m in it.members:
            choice[m] = int(j)
    return tuple(choice)
