"""Solver backends against known optima and a brute-force reference."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from solvers import METHODS, NO_LIMIT, Problem, Status, solve
from solvers.hull import lower_hull, pareto_front

EXACT = ["cpsat", "milp", "auto", "exhaustive"]
ALL = ["greedy", "lp", *EXACT]


def _p(losses, costs, budget, ties=(), allowed=None, max_loss=None):
    return Problem(
        losses=[np.array(x, dtype=float) for x in losses],
        costs=[np.array(c, dtype=np.int64).reshape(len(c), -1) for c in costs],
        budgets=np.atleast_1d(budget),
        ties=ties,
        allowed=None if allowed is None else [np.array(a, dtype=bool) for a in allowed],
        max_loss=max_loss,
    )


# name -> (problem, optimal objective or None when infeasible, minimum budgets when infeasible)
FIXTURES = {
    "greedy-is-optimal": (_p([[4, 1, 0], [4, 1, 0]], [[1, 2, 4], [1, 2, 4]], 5), 2.0, None),
    # The greedy takes a's efficient cheap step first and is stuck at 10; the optimum spends
    # everything on b.
    "greedy-is-not-optimal": (_p([[10, 9], [10, 0]], [[0, 1], [0, 10]], 10), 10.0, None),
    "non-convex-option": (_p([[10, 9.5, 0], [5, 0]], [[0, 5, 10], [0, 5]], 10), 5.0, None),
    "dominated-options": (_p([[5, 6, 1, 1], [3, 0]], [[1, 1, 4, 5], [0, 3]], 5), 4.0, None),
    "tie-group": (_p([[5, 0], [0, 0], [3, 0]], [[0, 4], [0, 4], [0, 4]], 8, ties=[(0, 1)]), 3.0, None),
    "pinned-layer": (_p([[4, 1, 0], [4, 1, 0]], [[1, 2, 4], [1, 2, 4]], 5, allowed=[[0, 0, 1], [1, 1, 1]]), 4.0, None),
    "infeasible": (_p([[1, 0], [1, 0]], [[3, 5], [4, 9]], 6), None, (7.0,)),
    "infeasible-tie": (_p([[1, 0], [1, 0]], [[3, 5], [4, 9]], 6, ties=[(0, 1)]), None, (7.0,)),
    "zero-loss": (_p([[0, 0], [0, 0]], [[1, 2], [1, 2]], 2), 0.0, None),
    # Lossless: the fewest bytes with summed loss <= 1.5.
    "lossless": (_p([[4, 1, 0], [4, 1, 0]], [[1, 2, 4], [1, 2, 4]], NO_LIMIT, max_loss=1.5), 6.0, None),
    "lossless-exact-cap": (_p([[4, 1, 0], [4, 1, 0]], [[1, 2, 4], [1, 2, 4]], NO_LIMIT, max_loss=2.0), 4.0, None),
    "lossless-unreachable": (_p([[4, 1], [4, 1]], [[1, 2], [1, 2]], NO_LIMIT, max_loss=1.0), None, None),
    "lossless-over-budget": (_p([[4, 1, 0], [4, 1, 0]], [[1, 2, 4], [1, 2, 4]], 5, max_loss=1.5), None, None),
}


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("name", list(FIXTURES))
def test_fixtures_with_known_optima(name, method):
    problem, optimum, min_budgets = FIXTURES[name]
    sol = solve(problem, method=method)
    if optimum is None:
        assert sol.status is Status.INFEASIBLE and sol.choice is None
        if min_budgets is not None:
            assert sol.min_budgets == min_budgets
        return
    assert sol.choice is not None and problem.fits(sol.choice)
    assert sol.lower_bound <= optimum + 1e-9
    assert sol.objective >= optimum - 1e-9
    assert sol.objective - sol.lower_bound == pytest.approx(sol.gap * sol.objective, abs=1e-9)
    if method in EXACT:
        assert sol.objective == pytest.approx(optimum, abs=1e-9)
        assert sol.status is Status.OPTIMAL


def test_greedy_gap_is_honest_where_it_is_not_optimal():
    # Pair swaps fix the fixture above; here the optimum needs two downgrades for one upgrade.
    problem = _p([[10, 9], [10, 9], [10, 0.5]], [[0, 1], [0, 1], [0, 10]], 10)
    sol = solve(problem, method="greedy")
    assert sol.objective == 28 and sol.status is Status.FEASIBLE
    assert sol.lower_bound == pytest.approx(28 - 9.5 * 0.8)  # Dantzig's bound: c bought at 8/10
    assert solve(problem, method="auto").objective == 20.5
    assert solve(FIXTURES["greedy-is-not-optimal"][0], method="greedy").objective == 10  # found by a swap


def test_pareto_front_and_hull():
    costs = np.array([1, 2, 2, 3, 4, 6])
    losses = np.array([9.0, 5.0, 6.0, 4.9, 1.0, 1.0])
    front = pareto_front(costs, losses)
    assert front.tolist() == [0, 1, 3, 4]
    assert lower_hull(costs, losses, front).tolist() == [0, 1, 4]  # 3 sits above the 1->4 chord


def _random_problem(rng, n_layers, n_options, n_res, *, tiny=False, lossless=False):
    scale = 1e-9 if tiny else 1.0
    losses = [rng.exponential(1, n_options) * scale * rng.choice([1, 1e-3]) for _ in range(n_layers)]
    costs = [rng.integers(0, 30, (n_options, n_res)) for _ in range(n_layers)]
    ties = [(0, n_layers - 1)] if n_layers >= 3 and rng.random() < 0.4 else []
    allowed = None
    if rng.random() < 0.3:
        allowed = [rng.random(n_options) < 0.8 for _ in range(n_layers)]
        for a in allowed:
            a[rng.integers(n_options)] = True
        if ties:  # a tie group needs a common option
            allowed[0][0] = allowed[-1][0] = True
    low = np.sum([c.min(0) for c in costs], axis=0)
    high = np.sum([c.max(0) for c in costs], axis=0)
    budgets = (low + rng.uniform(-0.1, 0.8) * (high - low)).astype(np.int64)
    max_loss = None
    if lossless:
        budgets[0] = NO_LIMIT
        lo = sum(x.min() for x in losses)
        hi = sum(x.max() for x in losses)
        max_loss = float(lo + rng.uniform(-0.05, 0.6) * (hi - lo))
    return Problem(
        losses=losses,
        costs=costs,
        budgets=budgets,
        ties=ties,
        allowed=allowed,
        max_loss=max(max_loss, 0.0) if max_loss is not None else None,
    )


@pytest.mark.parametrize("seed", range(60))
def test_backends_agree_with_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_res = 1 if seed % 3 else 2
    lossless = seed % 4 == 1
    problem = _random_problem(
        rng, int(rng.integers(1, 6)), int(rng.integers(1, 5)), n_res, tiny=seed % 5 == 0, lossless=lossless
    )
    ref = solve(problem, method="exhaustive")
    for method in METHODS:
        if method == "greedy" and n_res > 1:  # several constraints: the greedy does not apply
            continue
        sol = solve(problem, method=method)
        if ref.status is Status.INFEASIBLE:
            assert sol.status is Status.INFEASIBLE, method
            continue
        assert sol.choice is not None and problem.fits(sol.choice), method
        assert sol.lower_bound <= ref.objective * (1 + 1e-7) + 1e-12, (method, sol, ref)
        if method in EXACT:
            # Exact up to the documented integer-scaling resolution (1e-7 of the objective).
            assert sol.objective <= ref.objective * (1 + 1e-6) + 1e-300, (method, sol, ref)


def test_exact_solvers_keep_tiny_losses_apart():
    # Losses of 1e-12 beside one huge option: scaling by the largest loss would round every
    # small one to zero and "prove" an arbitrary plan optimal; HiGHS would see them below its
    # tolerance. Both scale relative to the objective.
    losses = [np.array([3e-12, 2e-12, 1e3])] + [np.array([2e-12, 1e-12, 1e3])] * 4
    costs = [np.array([[1], [2], [0]])] * 5
    problem = Problem(losses=losses, costs=costs, budgets=np.array([8]))
    ref = solve(problem, method="exhaustive")
    for method in ("cpsat", "milp", "auto"):
        sol = solve(problem, method=method)
        assert sol.status is Status.OPTIMAL, method
        assert sol.objective == pytest.approx(ref.objective, rel=1e-6), method


def test_several_budgets():
    problem = _p([[3, 1, 0], [3, 1, 0]], [[[1, 1], [2, 5], [4, 2]], [[1, 1], [2, 5], [4, 2]]], [6, 7])
    with pytest.raises(ValueError, match="one constraint"):
        solve(problem, method="greedy")
    for method in ("auto", "cpsat", "milp"):
        sol = solve(problem, method=method)
        assert sol.status is Status.OPTIMAL and sol.objective == solve(problem, method="exhaustive").objective


def test_auto_certifies_large_problems_by_fixing_most_layers():
    rng = np.random.default_rng(0)
    n, j = 2000, 18
    sens = rng.lognormal(0, 2, n)
    bits = rng.choice([2, 3, 4, 5, 6, 8], size=(n, j))
    size = rng.integers(1000, 50000, n)
    costs = [(size[i] * bits[i] / 8).astype(np.int64).reshape(j, 1) for i in range(n)]
    losses = [sens[i] * 4.0 ** (-bits[i]) * rng.uniform(0.8, 1.25, j) for i in range(n)]
    budget = int(0.55 * sum(c.max() for c in costs))
    problem = Problem(losses=losses, costs=costs, budgets=np.array([budget]))
    sol = solve(problem, method="auto", gap=1e-6)
    assert sol.status is Status.OPTIMAL and sol.gap <= 1e-6
    assert "fixing" in sol.solver
    greedy = solve(problem, method="greedy")
    assert sol.objective <= greedy.objective and greedy.lower_bound <= sol.objective


def test_problem_validation_names_the_issue():
    with pytest.raises(ValueError, match="negative or non-finite loss"):
        _p([[1, float("nan")]], [[1, 2]], 3)
    with pytest.raises(ValueError, match="two tie groups"):
        _p([[1], [1], [1]], [[1], [1], [1]], 3, ties=[(0, 1), (1, 2)])
    with pytest.raises(ValueError, match="different numbers of options"):
        _p([[1], [1, 2]], [[1], [1, 2]], 3, ties=[(0, 1)])
    with pytest.raises(ValueError, match="allows no option"):
        _p([[1, 2]], [[1, 2]], 3, allowed=[[0, 0]])
    with pytest.raises(ValueError, match="allows no option that all its layers allow"):
        solve(_p([[1, 2], [1, 2]], [[1, 2], [1, 2]], 9, ties=[(0, 1)], allowed=[[1, 0], [0, 1]]))
    with pytest.raises(ValueError, match="unknown solver"):
        solve(_p([[1]], [[1]], 3), method="simplex")


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_returned_plan_respects_every_budget_exactly(data):
    n_layers = data.draw(st.integers(1, 12))
    n_options = data.draw(st.integers(1, 6))
    n_res = data.draw(st.integers(1, 2))
    ints = st.integers(0, 10**12)
    row = st.lists(ints, min_size=n_res, max_size=n_res)
    costs = [np.array(data.draw(st.lists(row, min_size=n_options, max_size=n_options))) for _ in range(n_layers)]
    losses = [
        np.array(data.draw(st.lists(st.floats(0, 1e6), min_size=n_options, max_size=n_options)))
        for _ in range(n_layers)
    ]
    budgets = np.array(data.draw(st.lists(st.integers(0, 10**13), min_size=n_res, max_size=n_res)))
    lossless = data.draw(st.booleans())
    max_loss = data.draw(st.floats(0, 1e7)) if lossless else None
    problem = Problem(losses=losses, costs=costs, budgets=budgets, max_loss=max_loss)
    methods = ["auto", "cpsat", "lp"] + (["greedy"] if (n_res == 1 or (lossless and n_res == 1)) else [])
    for method in methods:
        sol = solve(problem, method=method, time_limit=5)
        if sol.choice is None:
            assert sol.status in (Status.INFEASIBLE, Status.TIMEOUT)
            continue
        total = [sum(int(costs[i][j][r]) for i, j in enumerate(sol.choice)) for r in range(n_res)]
        assert all(t <= int(b) for t, b in zip(total, budgets, strict=True)), method
        if lossless:
            assert sum(losses[i][j] for i, j in enumerate(sol.choice)) <= max_loss * (1 + 1e-12), method
        assert sol.lower_bound <= sol.objective * (1 + 1e-9) + 1e-9


def test_vectorised_hulls_match_the_reference():
    from solvers.hull import hulls

    rng = np.random.default_rng(3)
    weights = [rng.integers(0, 20, rng.integers(1, 12)).astype(float) for _ in range(300)]
    values = [rng.uniform(0, 10, w.size).round(1) for w in weights]  # ties included
    fronts, hull_list = hulls(weights, values)
    for w, v, f, h in zip(weights, values, fronts, hull_list, strict=True):
        assert f.tolist() == pareto_front(w, v).tolist()
        assert h.tolist() == lower_hull(w, v, pareto_front(w, v)).tolist()
