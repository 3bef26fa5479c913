"""Lagrangian bounds and reduced-cost fixing.

For multipliers `λ >= 0` on the constraints, every plan `x` within them satisfies

    obj(x) >= L(λ) + Σ_i d_i(x_i),   L(λ) = Σ_i min_j (obj_ij + λ·w_ij) − λ·cap,
    d_ij = obj_ij + λ·w_ij − min_j (obj_ij + λ·w_ij) >= 0.

So `L(λ)` is a proven lower bound, and an option whose reduced cost `d_ij` exceeds the gap
between the best plan known (`ub`) and `L(λ)` cannot be part of any better plan: it can be
dropped. With the LP multipliers the gap is tiny, nearly every item keeps one option, and an
exact solver only sees the few items left (the core).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .instance import Instance

__all__ = ["Reduction", "lagrangian_bound", "reduce_instance"]


def lagrangian_bound(inst: Instance, lam: np.ndarray) -> tuple[float, list[np.ndarray]]:
    """`L(λ)` and the reduced costs `d` of every item's options."""
    lam = np.maximum(np.asarray(lam, dtype=np.float64), 0.0)
    total = 0.0
    reduced = []
    for o, r in zip(inst.obj, inst.rows, strict=True):
        value = o + (r @ lam if lam.size else 0.0)
        m = float(value.min())
        total += m
        reduced.append(value - m)
    return total - float(lam @ inst.cap) if lam.size else total, reduced


@dataclass(frozen=True)
class Reduction:
    """Items that keep more than one option (`core`, with their kept local options), and the
    option of every other item."""

    bound: float
    core: list[int]
    keep: list[np.ndarray]
    fixed: dict[int, int]


def reduce_instance(inst: Instance, lam: np.ndarray, ub: float, ub_picks: np.ndarray | None) -> Reduction:
    """Drop every option that cannot beat `ub` (see the module docstring). The options of
    `ub_picks` always survive, so the known plan stays a solution of the reduced problem."""
    bound, reduced = lagrangian_bound(inst, lam)
    slack = max(0.0, ub - bound) * (1 + 1e-9) + 1e-12 * max(1.0, abs(ub))
    core, keep, fixed = [], [], {}
    for i, d in enumerate(reduced):
        kept = np.flatnonzero(d <= slack)
        if ub_picks is not None and ub_picks[i] not in kept:
            kept = np.sort(np.append(kept, ub_picks[i]))
        if kept.size == 1:
            fixed[i] = int(kept[0])
        else:
            core.append(i)
            keep.append(kept)
    return Reduction(bound=bound, core=core, keep=keep, fixed=fixed)
