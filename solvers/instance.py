"""One internal form for both questions a `Problem` can ask.

An `Instance` is: pick one option per item, minimise `Σ obj`, subject to `Σ rows[:, k] <= cap[k]`
for every constraint `k`. Budgeted problems have `obj = loss` and one row per resource;
lossless problems have `obj = cost of resource 0` and rows `[loss, other resources...]`.
Budgets that bind nothing (`NO_LIMIT`) are left out. Every backend works on this form, so the
greedy, the LP, the Lagrangian bound and reduced-cost fixing are written once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .problem import NO_LIMIT, Item, Problem, merge_ties

__all__ = ["Instance", "build_instance"]


@dataclass(frozen=True)
class Instance:
    """Items with per-option objective values and constraint rows.

    Attributes:
        items: the merged items (tie groups folded, allowed options only).
        obj: per item, `(J,)` objective values.
        rows: per item, `(J, K)` constraint coefficients.
        cap: `(K,)` right-hand sides.
        integral: `(K,)` True where the row holds exact integer costs (False: losses).
        lossless: which question this is (see the module docstring).
    """

    items: list[Item]
    obj: list[np.ndarray]
    rows: list[np.ndarray]
    cap: np.ndarray
    integral: np.ndarray
    lossless: bool

    @property
    def n_constraints(self) -> int:
        return int(self.cap.size)

    def totals(self, picks: np.ndarray) -> tuple[float, np.ndarray]:
        """Objective and constraint totals of per-item picks (local option indices)."""
        obj = float(sum(o[j] for o, j in zip(self.obj, picks, strict=True)))
        if not self.cap.size:
            return obj, np.zeros(0)
        return obj, np.sum([r[j] for r, j in zip(self.rows, picks, strict=True)], axis=0)

    def feasible(self, picks: np.ndarray) -> bool:
        """Within every constraint: integer rows exactly, loss rows up to float rounding."""
        _, used = self.totals(picks)
        exact = used[self.integral] <= self.cap[self.integral]
        rounded = used[~self.integral] <= self.cap[~self.integral] * (1 + 1e-12)
        return bool(np.all(exact) and np.all(rounded))

    def padded(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`(obj [n, J], rows [n, J, K], valid [n, J])` with every item padded to the widest."""
        width = max(o.size for o in self.obj)
        n, k = len(self.obj), self.n_constraints
        obj = np.full((n, width), np.inf)
        rows = np.full((n, width, k), np.inf)
        valid = np.zeros((n, width), dtype=bool)
        for i, (o, r) in enumerate(zip(self.obj, self.rows, strict=True)):
            obj[i, : o.size] = o
            rows[i, : o.size] = r
            valid[i, : o.size] = True
        return obj, rows, valid

    def restrict(self, core: list[int], keep: list[np.ndarray], fixed: dict[int, int]) -> Instance:
        """The instance of the `core` items, each limited to its `keep` options, with the
        constraints' right-hand sides reduced by what the `fixed` items use."""
        used = np.sum([self.rows[i][j] for i, j in fixed.items()], axis=0) if fixed else np.zeros(self.n_constraints)
        items = [
            Item(
                members=self.items[i].members,
                options=self.items[i].options[kept],
                losses=self.items[i].losses[kept],
                costs=self.items[i].costs[kept],
            )
            for i, kept in zip(core, keep, strict=True)
        ]
        return Instance(
            items=items,
            obj=[self.obj[i][kept] for i, kept in zip(core, keep, strict=True)],
            rows=[self.rows[i][kept] for i, kept in zip(core, keep, strict=True)],
            cap=self.cap - used,
            integral=self.integral,
            lossless=self.lossless,
        )

    def minimum_use(self) -> np.ndarray:
        """Per constraint, the least any plan can use (each constraint on its own)."""
        if not self.cap.size:
            return np.zeros(0)
        return np.sum([r.min(axis=0) for r in self.rows], axis=0)


def build_instance(problem: Problem, items: list[Item] | None = None) -> Instance:
    """The `Instance` of a `Problem` (see the module docstring)."""
    items = merge_ties(problem) if items is None else items
    budgets = problem.budgets
    if problem.lossless:
        # A budget on resource 0 itself constrains nothing while resource 0 is minimised: if
        # the cheapest plan within the loss cap exceeds it, no plan fits (checked by `solve`).
        keep = [r for r in range(1, problem.n_resources) if budgets[r] < NO_LIMIT]
        obj = [it.costs[:, 0].astype(np.float64) for it in items]
        rows = [np.column_stack([it.losses] + [it.costs[:, r] for r in keep]).astype(np.float64) for it in items]
        cap = np.array([problem.max_loss] + [budgets[r] for r in keep], dtype=np.float64)
        integral = np.array([False] + [True] * len(keep))
    else:
        keep = [r for r in range(problem.n_resources) if budgets[r] < NO_LIMIT]
        obj = [it.losses.astype(np.float64) for it in items]
        rows = [it.costs[:, keep].astype(np.float64).reshape(len(it.options), len(keep)) for it in items]
        cap = np.array([budgets[r] for r in keep], dtype=np.float64)
        integral = np.ones(len(keep), dtype=bool)
    return Instance(items=items, obj=obj, rows=rows, cap=cap, integral=integral, lossless=problem.lossless)
