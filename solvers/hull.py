"""Dominance and convex hulls of one item's options in the (weight, objective) plane."""

from __future__ import annotations

import numpy as np

__all__ = ["hulls", "lower_hull", "pareto_front"]


def pareto_front(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Indices of the options not dominated in (weight, value), by increasing weight.

    An option is dominated when another weighs no more and is strictly better, or weighs
    strictly less and is no worse. Among exact duplicates the lowest index is kept.

    Example:
        >>> pareto_front(np.array([1, 2, 2, 3]), np.array([5.0, 3.0, 4.0, 3.0])).tolist()
        [0, 1]
    """
    order = np.lexsort((np.arange(weights.size), values, weights))
    keep, best = [], np.inf
    for j in order:
        if values[j] < best:
            keep.append(int(j))
            best = values[j]
    return np.asarray(keep, dtype=np.int64)


def lower_hull(weights: np.ndarray, values: np.ndarray, front: np.ndarray) -> np.ndarray:
    """Subset of the Pareto `front` (by increasing weight) on its lower convex hull."""
    hull: list[int] = []
    for j in front:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the segment a -> j: drop it.
            cross = (weights[b] - weights[a]) * (values[j] - values[a]) - (values[b] - values[a]) * (
                weights[j] - weights[a]
            )
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(int(j))
    return np.asarray(hull, dtype=np.int64)


def hulls(weights: list[np.ndarray], values: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Pareto fronts and lower hulls of many items at once (vectorised over items).

    Returns per item `(front, hull)`, the same as `pareto_front` and `lower_hull` give.
    """
    n = len(weights)
    width = max(w.size for w in weights)
    w = np.full((n, width), np.inf)
    v = np.full((n, width), np.inf)
    for i, (wi, vi) in enumerate(zip(weights, values, strict=True)):
        w[i, : wi.size] = wi
        v[i, : vi.size] = vi
    idx = np.broadcast_to(np.arange(width), (n, width))
    order = np.lexsort((idx, v, w), axis=-1)
    ws = np.take_along_axis(w, order, axis=-1)
    vs = np.take_along_axis(v, order, axis=-1)
    # Pareto: keep points whose value beats every lighter (or equally light, earlier) point.
    prev_best = np.concatenate([np.full((n, 1), np.inf), np.minimum.accumulate(vs, axis=-1)[:, :-1]], axis=-1)
    on_front = (vs < prev_best) & np.isfinite(ws)
    keep = on_front.copy()
    cols = np.arange(width)
    while True:
        # Previous and next kept point of every position.
        prev = np.maximum.accumulate(np.where(keep, cols, -1), axis=-1)
        prev = np.concatenate([np.full((n, 1), -1), prev[:, :-1]], axis=-1)
        nxt = np.minimum.accumulate(np.where(keep, cols, width)[:, ::-1], axis=-1)[:, ::-1]
        nxt = np.concatenate([nxt[:, 1:], np.full((n, 1), width)], axis=-1)
        inner = keep & (prev >= 0) & (nxt < width)
        a = np.clip(prev, 0, width - 1)
        c = np.clip(nxt, 0, width - 1)
        wa, va = np.take_along_axis(ws, a, -1), np.take_along_axis(vs, a, -1)
        wc, vc = np.take_along_axis(ws, c, -1), np.take_along_axis(vs, c, -1)
        with np.errstate(invalid="ignore"):
            cross = (ws - wa) * (vc - va) - (vs - va) * (wc - wa)
        drop = inner & (cross <= 0)  # on or above the chord between its neighbours
        if not drop.any():
            break
        keep &= ~drop
    fronts = [order[i][on_front[i]] for i in range(n)]
    hull_list = [order[i][keep[i]] for i in range(n)]
    return fronts, hull_list
