"""Solvers for the allocation problem (multiple-choice knapsack with tie groups).

Imports numpy, OR-Tools and cvxpy only; never torch, `profilers` or `allocator`.
"""

from .problem import NO_LIMIT, Item, Problem, Solution, Status, merge_ties
from .solve import METHODS, Method, solve

__all__ = ["METHODS", "NO_LIMIT", "Item", "Method", "Problem", "Solution", "Status", "merge_ties", "solve"]
