"""Brute-force reference: try every plan. For tests and tiny problems only."""

from __future__ import annotations

import itertools
import math

import numpy as np

from .instance import Instance

__all__ = ["MAX_ASSIGNMENTS", "exhaustive_instance"]

MAX_ASSIGNMENTS = 2_000_000


def exhaustive_instance(inst: Instance) -> np.ndarray | None:
    """The best feasible per-item picks of `inst`, or None when none fits.

    Raises:
        ValueError: more than `MAX_ASSIGNMENTS` plans.
    """
    count = math.prod(o.size for o in inst.obj)
    if count > MAX_ASSIGNMENTS:
        raise ValueError(f"{count} plans are too many to enumerate (limit {MAX_ASSIGNMENTS})")
    best, best_value = None, math.inf
    for combo in itertools.product(*(range(o.size) for o in inst.obj)):
        picks = np.array(combo)
        if not inst.feasible(picks):
            continue
        value, _ = inst.totals(picks)
        if value < best_value:
            best, best_value = picks, value
    return best
