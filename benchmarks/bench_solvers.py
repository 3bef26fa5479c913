"""Solver benchmark: certified gaps and wall time on synthetic instances, side by side with
PuLP + CBC (the MILP route HAWQ-V3 and NVIDIA ModelOpt AutoQuantize take).

Instances (`benchmarks/instances.py`): L in {50, 200, 1000, 5000} layers x 18 options,
log-spread sensitivities with dominated and non-convex options; one budget (bytes) or two
(bytes and BOPs); with and without tie groups. Targets from the solver issue:

- L = 5000, one budget: certified gap <= 1e-6 in <= 0.5 s;
- L <= 1000: proven optimal (gap <= 1e-9) in <= 1 s;
- two budgets, L = 1000: gap <= 1e-4 in <= 5 s.

Every plan is checked against every budget in exact integer arithmetic. Prints one table.

Usage: .venv/bin/python benchmarks/bench_solvers.py [--no-pulp] [--cbc-limit SECONDS]
"""

from __future__ import annotations

import argparse
import itertools
import time

from instances import make_problem

from solvers import Problem, Status, solve


def pulp_cbc(problem: Problem, time_limit: float) -> tuple[float | None, float, str]:
    """The same problem as a PuLP binary program solved by CBC: (objective, seconds, status)."""
    import pulp

    start = time.perf_counter()
    m = pulp.LpProblem("mckp", pulp.LpMinimize)
    x = [
        [pulp.LpVariable(f"x_{i}_{j}", cat="Binary") for j in range(len(problem.losses[i]))]
        for i in range(problem.n_layers)
    ]
    m += pulp.lpSum(float(problem.losses[i][j]) * x[i][j] for i in range(problem.n_layers) for j in range(len(x[i])))
    for xi in x:
        m += pulp.lpSum(xi) == 1
    for r in range(problem.n_resources):
        m += pulp.lpSum(
            int(problem.costs[i][j, r]) * x[i][j] for i in range(problem.n_layers) for j in range(len(x[i]))
        ) <= int(problem.budgets[r])
    for group in problem.ties:
        for a, b in itertools.pairwise(group):
            for j in range(len(x[a])):
                m += x[a][j] == x[b][j]
    m.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=1e-9))
    seconds = time.perf_counter() - start
    if pulp.LpStatus[m.status] not in ("Optimal",) and m.sol_status not in (1, 2):
        return None, seconds, pulp.LpStatus[m.status]
    choice = [max(range(len(xi)), key=lambda j, xi=xi: xi[j].value() or 0) for xi in x]
    if not problem.fits(choice):
        return None, seconds, "plan breaks a budget"
    return problem.objective(choice), seconds, pulp.LpStatus[m.status].lower()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-pulp", action="store_true", help="skip the PuLP + CBC comparison")
    parser.add_argument("--cbc-limit", type=float, default=60.0, help="seconds CBC may take per instance")
    args = parser.parse_args()

    rows = []
    print(
        f"{'layers':>6} {'budgets':>7} {'ties':>4} | {'auto s':>7} {'status':>8} {'proven gap':>10} "
        f"{'backend':<44} | {'CBC s':>7} {'CBC obj / ours':>14} {'time ratio':>10}"
    )
    for layers in (50, 200, 1000, 5000):
        for budgets, ties in ((1, False), (1, True), (2, False)):
            problem = make_problem(layers, budgets=budgets, ties=ties)
            target = 1e-4 if budgets > 1 else (1e-9 if layers <= 1000 else 1e-6)
            solve(problem, method="auto", gap=target)  # warm up imports
            start = time.perf_counter()
            sol = solve(problem, method="auto", gap=target, time_limit=5.0)
            seconds = time.perf_counter() - start
            assert sol.choice is not None and problem.fits(sol.choice), "a plan broke a budget"
            cbc = ""
            if not args.no_pulp and layers <= 1000:
                obj, cbc_s, status = pulp_cbc(problem, args.cbc_limit)
                ratio = "-" if obj is None else f"{obj / sol.objective:.9f}"
                cbc = f"{cbc_s:7.2f} {ratio:>14} {cbc_s / seconds:9.0f}x" + ("" if obj is not None else f" ({status})")
            elif not args.no_pulp:
                cbc = f"{'(skipped: 5000 layers x 18 binaries)':>34}"
            ok = sol.status is Status.OPTIMAL and sol.gap <= target
            print(
                f"{layers:6d} {budgets:7d} {'yes' if ties else 'no':>4} | {seconds:7.3f} {sol.status.value:>8} "
                f"{sol.gap:10.1e} {sol.solver[:44]:<44} | {cbc}" + ("" if ok else "   <- target missed")
            )
            rows.append((layers, budgets, ties, seconds, sol.gap, ok))
    print("\ntargets:")
    big = [r for r in rows if r[0] == 5000 and r[1] == 1]
    print(f"  L=5000, one budget, gap <= 1e-6 in <= 0.5 s: {[(f'{r[3]:.3f}s', f'{r[4]:.1e}') for r in big]}")
    small = [r for r in rows if r[0] <= 1000 and r[1] == 1]
    print(f"  L<=1000, one budget, gap <= 1e-9 in <= 1 s: worst {max(r[3] for r in small):.3f}s, "
          f"gap {max(r[4] for r in small):.1e}")  # fmt: skip
    two = [r for r in rows if r[0] == 1000 and r[1] == 2]
    print(f"  L=1000, two budgets, gap <= 1e-4 in <= 5 s: {[(f'{r[3]:.3f}s', f'{r[4]:.1e}') for r in two]}")


if __name__ == "__main__":
    main()
