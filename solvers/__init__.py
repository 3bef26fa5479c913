"""Solvers for the allocation problem (multiple-choice knapsack with tie groups).

Imports numpy and OR-Tools only; never torch, `profilers` or `allocator`.
"""

from .cpsat import solve_cpsat
from .exhaustive import solve_exhaustive
from .greedy import solve_greedy
from .problem import Item, Problem, Solution, Status, merge_ties
from .solve import METHODS, Method, solve

__all__ = [
    "METHODS",
    "Item",
    "Method",
    "Problem",
    "Solution",
    "Status",
    "merge_ties",
    "solve",
    "solve_cpsat",
    "solve_exhaustive",
    "solve_greedy",
]
