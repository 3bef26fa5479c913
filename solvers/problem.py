"""The allocation problem as numbers: a multiple-choice knapsack with tie groups.

Layer `l` has options `j = 0..J_l-1`, each with a loss `losses[l][j] >= 0` and integer costs
`costs[l][j, r]` in every resource `r` (bytes, BOPs, ...). Pick exactly one allowed option per
layer. Two questions can be asked of it:

- *budgeted* (default): minimise the summed loss with every resource's summed cost at most
  `budgets[r]`;
- *lossless* (`max_loss` set): minimise the summed cost of resource 0 with the summed loss at
  most `max_loss` (and the other resources within their budgets).

Layers in one tie group must pick the same option index (they share a format).

No torch here: the solver layer reads numbers and returns numbers.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["NO_LIMIT", "Item", "Problem", "Solution", "Status", "merge_ties"]

NO_LIMIT = np.iinfo(np.int64).max // 8  # a budget that binds nothing (sums of costs stay far below int64)


class Status(str, enum.Enum):
    """Outcome of a solve. Callers must check it before using `Solution.choice`."""

    OPTIMAL = "optimal"  # proven optimal (gap within the solver's tolerance)
    FEASIBLE = "feasible"  # a plan within budget; `gap` bounds how far from optimal
    INFEASIBLE = "infeasible"  # no plan fits; `min_budgets` says what would
    TIMEOUT = "timeout"  # time ran out; `choice` holds the best plan found, if any


@dataclass(frozen=True)
class Problem:
    """A multiple-choice knapsack instance.

    Attributes:
        losses: per layer, `(J_l,)` non-negative losses.
        costs: per layer, `(J_l, R)` non-negative integer costs.
        budgets: `(R,)` integer limits, one per resource (`NO_LIMIT` for none).
        ties: groups of layer indices that must pick the same option index.
        allowed: per layer, a `(J_l,)` boolean mask of the options it may take (None: all).
        max_loss: when set, minimise the cost of resource 0 subject to summed loss <= max_loss.
    """

    losses: Sequence[np.ndarray]
    costs: Sequence[np.ndarray]
    budgets: np.ndarray
    ties: Sequence[Sequence[int]] = field(default_factory=tuple)
    allowed: Sequence[np.ndarray] | None = None
    max_loss: float | None = None

    def __post_init__(self) -> None:
        budgets = np.atleast_1d(np.asarray(self.budgets, dtype=np.int64))
        object.__setattr__(self, "budgets", budgets)
        if len(self.losses) != len(self.costs):
            raise ValueError(f"{len(self.losses)} loss rows but {len(self.costs)} cost rows")
        if not self.losses:
            raise ValueError("a problem needs at least one layer")
        losses, costs = [], []
        for i, (ls, cs) in enumerate(zip(self.losses, self.costs, strict=True)):
            ls = np.asarray(ls, dtype=np.float64).reshape(-1)
            cs = np.asarray(cs, dtype=np.int64).reshape(len(ls), -1)
            if ls.size == 0:
                raise ValueError(f"layer {i} has no options")
            if cs.shape[1] != budgets.size:
                raise ValueError(f"layer {i} has {cs.shape[1]} cost columns for {budgets.size} budgets")
            if not np.all(np.isfinite(ls)) or np.any(ls < 0):
                raise ValueError(f"layer {i} has a negative or non-finite loss")
            if np.any(cs < 0):
                raise ValueError(f"layer {i} has a negative cost")
            losses.append(ls)
            costs.append(cs)
        object.__setattr__(self, "losses", tuple(losses))
        object.__setattr__(self, "costs", tuple(costs))
        if self.allowed is None:
            allowed = tuple(np.ones(ls.size, dtype=bool) for ls in losses)
        else:
            if len(self.allowed) != len(losses):
                raise ValueError(f"{len(self.allowed)} allowed masks for {len(losses)} layers")
            allowed = tuple(np.asarray(a, dtype=bool).reshape(-1) for a in self.allowed)
            for i, (a, ls) in enumerate(zip(allowed, losses, strict=True)):
                if a.size != ls.size:
                    raise ValueError(f"layer {i}'s allowed mask has {a.size} entries for {ls.size} options")
                if not a.any():
                    raise ValueError(f"layer {i} allows no option")
        object.__setattr__(self, "allowed", allowed)
        seen: set[int] = set()
        ties = []
        for group in self.ties:
            group = tuple(int(i) for i in group)
            if any(i < 0 or i >= len(losses) for i in group):
                raise ValueError(f"tie group {group} names a layer outside 0..{len(losses) - 1}")
            if seen & set(group):
                raise ValueError(f"layer(s) {sorted(seen & set(group))} appear in two tie groups")
            if len({losses[i].size for i in group}) > 1:
                raise ValueError(f"tie group {group} mixes layers with different numbers of options")
            seen |= set(group)
            ties.append(group)
        object.__setattr__(self, "ties", tuple(ties))
        if self.max_loss is not None and not (np.isfinite(self.max_loss) and self.max_loss >= 0):
            raise ValueError(f"max_loss must be a non-negative number, got {self.max_loss}")

    @property
    def n_layers(self) -> int:
        return len(self.losses)

    @property
    def n_resources(self) -> int:
        return int(self.budgets.size)

    @property
    def lossless(self) -> bool:
        """True when the question is the cheapest plan within `max_loss`."""
        return self.max_loss is not None

    def evaluate(self, choice: Sequence[int]) -> tuple[float, np.ndarray]:
        """Summed loss and per-resource cost of a full assignment."""
        loss = float(sum(self.losses[i][j] for i, j in enumerate(choice)))
        cost = np.sum([self.costs[i][j] for i, j in enumerate(choice)], axis=0, dtype=np.int64)
        return loss, cost

    def objective(self, choice: Sequence[int]) -> float:
        """What is minimised: the loss, or (lossless) the cost of resource 0."""
        loss, cost = self.evaluate(choice)
        return float(cost[0]) if self.lossless else loss

    def fits(self, choice: Sequence[int]) -> bool:
        """Whether an assignment respects every budget, the loss cap, allowed options and ties
        (costs in exact integer arithmetic)."""
        if len(choice) != self.n_layers:
            return False
        if not all(self.allowed[i][j] for i, j in enumerate(choice)):
            return False
        loss, cost = self.evaluate(choice)
        if np.any(cost > self.budgets):
            return False
        if self.max_loss is not None and loss > self.max_loss * (1 + 1e-12):
            return False
        return all(len({choice[i] for i in g}) == 1 for g in self.ties)


@dataclass(frozen=True)
class Item:
    """A decision unit after merging tie groups: `members` take the same option index.

    Attributes:
        members: layer indices.
        options: the option indices (of every member) this item may take.
        losses: `(J,)` summed losses of those options.
        costs: `(J, R)` summed costs of those options.
    """

    members: tuple[int, ...]
    options: np.ndarray
    losses: np.ndarray
    costs: np.ndarray


def merge_ties(problem: Problem) -> list[Item]:
    """Fold every tie group into one item (losses and costs summed, allowed options
    intersected); untied layers stay alone.

    Raises:
        ValueError: a tie group whose members allow no common option.
    """
    assert problem.allowed is not None
    group_of = {i: g for g in problem.ties for i in g}
    items, done = [], set()
    for i in range(problem.n_layers):
        if i in done:
            continue
        members = group_of.get(i, (i,))
        done |= set(members)
        if len(members) == 1:
            mask = problem.allowed[i]
            if mask.all():
                items.append(Item((i,), np.arange(mask.size), problem.losses[i], problem.costs[i]))
            else:
                options = np.flatnonzero(mask)
                items.append(Item((i,), options, problem.losses[i][options], problem.costs[i][options]))
            continue
        mask = np.logical_and.reduce([problem.allowed[m] for m in members])
        if not mask.any():
            raise ValueError(f"tie group {members} allows no option that all its layers allow")
        options = np.flatnonzero(mask)
        items.append(
            Item(
                members=tuple(members),
                options=options,
                losses=np.sum([problem.losses[m][options] for m in members], axis=0),
                costs=np.sum([problem.costs[m][options] for m in members], axis=0),
            )
        )
    return items


@dataclass(frozen=True)
class Solution:
    """What every backend returns.

    Attributes:
        status: see `Status`.
        choice: option index per layer, or None when there is no plan.
        objective: value of what is minimised (loss, or resource-0 cost when lossless); inf
            without a plan.
        lower_bound: proven lower bound on the optimal objective.
        cost: per-resource cost of `choice`.
        loss: summed loss of `choice`.
        solver: backend name(s) that produced it.
        wall_s: seconds spent.
        min_budgets: when INFEASIBLE, per resource the least cost any plan needs for it alone
            (and, lossless, the least loss any plan reaches as the last entry).
    """

    status: Status
    choice: tuple[int, ...] | None
    objective: float
    lower_bound: float
    cost: tuple[int, ...]
    solver: str
    wall_s: float = 0.0
    min_budgets: tuple[float, ...] | None = None
    loss: float = float("inf")

    @property
    def gap(self) -> float:
        """Relative optimality gap `(objective - lower_bound) / objective` (0 when both are 0)."""
        if self.choice is None:
            return float("inf")
        if self.objective <= 0:
            return 0.0
        return max(0.0, (self.objective - self.lower_bound) / self.objective)
