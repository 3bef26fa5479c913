"""Solver backends against known optima and a brute-force reference."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from solvers import Problem, Status, solve, solve_cpsat, solve_exhaustive, solve_greedy
from solvers.greedy import lower_hull, pareto_front

ONE_RESOURCE = ["greedy", "cpsat", "auto", "exhaustive"]


def _p(losses, costs, budget, ties=()):
    return Problem(
        losses=[np.array(x, dtype=float) for x in losses],
        costs=[np.array(c, dtype=np.int64).reshape(len(c), -1) for c in costs],
        budgets=np.atleast_1d(budget),
        ties=ties,
    )


# (problem, optimal objective or None when infeasible, minimum budgets when infeasible)
FIXTURES = {
    "greedy-is-optimal": (_p([[4, 1, 0], [4, 1, 0]], [[1, 2, 4], [1, 2, 4]], 5), 2.0, None),
    # The greedy's efficiency order takes a's cheap upgrade first and is then stuck at 10;
    # the optimum spends everything on b.
    "greedy-is-not-optimal": (_p([[10, 9], [10, 0]], [[0, 1], [0, 10]], 10), 10.0, None),
    "non-convex-option": (_p([[10, 9.5, 0], [5, 0]], [[0, 5, 10], [0, 5]], 10), 5.0, None),
    "tie-group": (_p([[5, 0], [0, 0], [3, 0]], [[0, 4], [0, 4], [0, 4]], 8, ties=[(0, 1)]), 3.0, None),
    "infeasible": (_p([[1, 0], [1, 0]], [[3, 5], [4, 9]], 6), None, (7,)),
    "infeasible-tie": (_p([[1, 0], [1, 0]], [[3, 5], [4, 9]], 6, ties=[(0, 1)]), None, (7,)),
    "zero-loss": (_p([[0, 0], [0, 0]], [[1, 2], [1, 2]], 2), 0.0, None),
}


@pytest.mark.parametrize("method", ONE_RESOURCE)
@pytest.mark.parametrize("name", list(FIXTURES))
def test_fixtures_with_known_optima(name, method):
    problem, optimum, min_budgets = FIXTURES[name]
    sol = solve(problem, method=method)
    if optimum is None:
        assert sol.status is Status.INFEASIBLE and sol.choice is None
        assert sol.min_budgets == min_budgets
        return
    assert sol.choice is not None and problem.fits(sol.choice)
    assert sol.lower_bound <= optimum + 1e-12
    if method == "greedy":
        assert sol.objective >= optimum - 1e-12
        assert sol.objective - sol.lower_bound == pytest.approx(sol.gap * sol.objective, abs=1e-12)
    else:
        assert sol.objective == pytest.approx(optimum, abs=1e-9)
        assert sol.status is Status.OPTIMAL


def test_greedy_gap_is_honest_where_it_is_not_optimal():
    problem, optimum, _ = FIXTURES["greedy-is-not-optimal"]
    sol = solve_greedy(problem)
    assert sol.objective > optimum and sol.status is Status.FEASIBLE and sol.gap > 0
    assert solve(problem, method="auto").objective == optimum


def test_pareto_front_and_hull():
    costs = np.array([1, 2, 2, 3, 4, 6])
    losses = np.array([9.0, 5.0, 6.0, 4.9, 1.0, 1.0])
    front = pareto_front(costs, losses)
    assert front.tolist() == [0, 1, 3, 4]
    assert lower_hull(costs, losses, front).tolist() == [0, 1, 4]  # 3 sits above the 1->4 chord


def _random_problem(rng, n_layers, n_options, n_res, tiny=False):
    scale = 1e-9 if tiny else 1.0
    losses = [rng.exponential(1, n_options) * scale * rng.choice([1, 1e-3]) for _ in range(n_layers)]
    costs = [rng.integers(0, 30, (n_options, n_res)) for _ in range(n_layers)]
    ties = [(0, n_layers - 1)] if n_layers >= 3 and rng.random() < 0.4 else []
    low = np.sum([c.min(0) for c in costs], axis=0)
    high = np.sum([c.max(0) for c in costs], axis=0)
    budgets = (low + rng.uniform(-0.1, 0.8) * (high - low)).astype(np.int64)
    return Problem(losses=losses, costs=costs, budgets=budgets, ties=ties)


@pytest.mark.parametrize("seed", range(60))
def test_backends_agree_with_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_res = 1 if seed % 3 else 2
    problem = _random_problem(rng, int(rng.integers(1, 6)), int(rng.integers(1, 5)), n_res, tiny=seed % 5 == 0)
    ref = solve_exhaustive(problem)
    methods = ["cpsat", "auto"] + (["greedy"] if n_res == 1 else [])
    for method in methods:
        sol = solve(problem, method=method)
        if ref.status is Status.INFEASIBLE:
            assert sol.status is Status.INFEASIBLE
            continue
        assert problem.fits(sol.choice)
        assert sol.lower_bound <= ref.objective * (1 + 1e-9)
        if method != "greedy":
            # Exact up to the documented integer-scaling resolution (1e-7 of the objective).
            assert sol.objective <= ref.objective * (1 + 1e-6) + 1e-300, (method, sol, ref)


def test_cpsat_scales_tiny_losses_relative_to_the_objective():
    # Losses of 1e-12 with one huge option: scaling by the largest loss would round all the
    # small ones to zero and "prove" an arbitrary plan optimal.
    losses = [np.array([3e-12, 2e-12, 1e3])] + [np.array([2e-12, 1e-12, 1e3])] * 4
    costs = [np.array([[1], [2], [0]])] * 5
    problem = Problem(losses=losses, costs=costs, budgets=np.array([8]))
    ref = solve_exhaustive(problem)
    sol = solve_cpsat(problem)
    assert sol.status is Status.OPTIMAL
    assert sol.objective == pytest.approx(ref.objective, rel=1e-6)


def test_several_budgets_go_to_the_exact_solver():
    problem = _p([[3, 1, 0], [3, 1, 0]], [[[1, 1], [2, 5], [4, 2]], [[1, 1], [2, 5], [4, 2]]], [6, 7])
    with pytest.raises(ValueError, match="one resource"):
        solve_greedy(problem)
    sol = solve(problem, method="auto")
    assert sol.status is Status.OPTIMAL and sol.objective == solve_exhaustive(problem).objective


def test_problem_validation_names_the_issue():
    with pytest.raises(ValueError, match="negative or non-finite loss"):
        _p([[1, float("nan")]], [[1, 2]], 3)
    with pytest.raises(ValueError, match="two tie groups"):
        _p([[1], [1], [1]], [[1], [1], [1]], 3, ties=[(0, 1), (1, 2)])
    with pytest.raises(ValueError, match="different numbers of options"):
        _p([[1], [1, 2]], [[1], [1, 2]], 3, ties=[(0, 1)])


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_returned_plan_respects_every_budget_exactly(data):
    n_layers = data.draw(st.integers(1, 12))
    n_options = data.draw(st.integers(1, 6))
    n_res = data.draw(st.integers(1, 2))
    ints = st.integers(0, 10**12)
    costs = [
        np.array(
            data.draw(st.lists(st.lists(ints, min_size=n_res, max_size=n_res), min_size=n_options, max_size=n_options))
        )
        for _ in range(n_layers)
    ]
    losses = [
        np.array(data.draw(st.lists(st.floats(0, 1e6), min_size=n_options, max_size=n_options)))
        for _ in range(n_layers)
    ]
    budgets = np.array(data.draw(st.lists(st.integers(0, 10**13), min_size=n_res, max_size=n_res)))
    problem = Problem(losses=losses, costs=costs, budgets=budgets)
    for method in ["auto", "cpsat"] + (["greedy"] if n_res == 1 else []):
        sol = solve(problem, method=method, time_limit=5)
        if sol.choice is None:
            assert sol.status in (Status.INFEASIBLE, Status.TIMEOUT)
            if sol.status is Status.INFEASIBLE and n_res == 1:
                assert sum(int(c[:, 0].min()) for c in costs) > int(budgets[0])
            continue
        total = [sum(int(costs[i][j][r]) for i, j in enumerate(sol.choice)) for r in range(n_res)]
        assert all(t <= int(b) for t, b in zip(total, budgets, strict=True))
        assert sol.lower_bound <= sol.objective * (1 + 1e-9) + 1e-9
