"""Synthetic allocation problems shaped like real ones, for the solver benchmark.

Each layer has a size (log-uniform, 10^4..10^6 weights), a sensitivity (log-normal, a few
orders of magnitude apart) and 18 options: 6 bit widths x 3 group sizes. Bytes follow the
packed format (codes + 4 bytes per group); BOPs are MACs x bits x 16. The loss is
`sensitivity x 4^-bits`, scaled per group size and perturbed by 0.7-1.4, so options are
dominated or off the convex hull as in measured profiles.
"""

from __future__ import annotations

import numpy as np

from solvers import NO_LIMIT, Problem

BITS = (2, 3, 4, 5, 6, 8)
GROUPS = ((64, 1.0), (128, 1.35), (None, 2.2))  # group size, loss factor


def make_problem(n_layers: int, *, seed: int = 0, budgets: int = 1, ties: bool = False, fill: float = 0.55) -> Problem:
    """A problem with `budgets` resources (bytes, then BOPs) at `fill` of the way from the
    smallest to the largest plan."""
    rng = np.random.default_rng(seed)
    size = np.exp(rng.uniform(np.log(1e4), np.log(1e6), n_layers)).astype(np.int64)
    cols = rng.choice([384, 768, 1536, 4096], n_layers)
    sens = rng.lognormal(0.0, 2.0, n_layers)
    tokens = rng.integers(64, 512, n_layers)
    losses, costs = [], []
    for i in range(n_layers):
        loss, cost = [], []
        for g, factor in GROUPS:
            groups = size[i] // (g or cols[i]) + 1
            for b in BITS:
                loss.append(sens[i] * factor * 4.0 ** (-b) * rng.uniform(0.7, 1.4))
                row = [int(np.ceil(size[i] * b / 8) + 4 * groups)]
                if budgets > 1:
                    row.append(int(size[i] * tokens[i] * b * 16))
                cost.append(row)
        losses.append(np.array(loss))
        costs.append(np.array(cost, dtype=np.int64))
    low = np.sum([c.min(0) for c in costs], axis=0)
    high = np.sum([c.max(0) for c in costs], axis=0)
    limit = (low + fill * (high - low)).astype(np.int64)
    if budgets > 1:
        limit[1] = int(low[1] + (fill - 0.15) * (high[1] - low[1]))  # make the second budget bind too
    groups = []
    if ties:
        order = rng.permutation(n_layers)
        k = 0
        while k + 3 <= n_layers // 10 * 3:
            groups.append(tuple(int(x) for x in order[k : k + 3]))
            k += 3
    return Problem(losses=losses, costs=costs, budgets=limit, ties=groups)


__all__ = ["NO_LIMIT", "make_problem"]
