"""Dominance and convex hulls of one item's options in the (weight, objective) plane."""

from __future__ import annotations

import numpy as np

__all__ = ["lower_hull", "pareto_front"]


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
