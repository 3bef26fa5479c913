"""Load on `allocator serve`, loopback only, bounded in count and time.

Prints, from one run:
1. 200 concurrent solve requests of a 200-layer profile (5 budgets in turn, by profile id):
   how many succeeded, whether every plan equals the local solver's (what the CLI writes) byte
   for byte, and p50/p99/max latency and throughput;
2. a restart in the middle of uploads: 40 profiles uploaded from 8 threads while the server is
   killed (SIGKILL) and started again on the same data folder; every upload the server
   acknowledged must be there, intact, after the restart.

Usage: .venv/bin/python benchmarks/bench_service.py [--requests 200] [--layers 200] [--workers 2]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import contextlib

from instances import make_profile

from allocator.client import Client, ServiceError
from allocator.planning.build import plan_from_profile
from allocator.service import spawned

BUDGETS = ("2.8bpw", "3.25bpw", "3.5bpw", "4.25bpw", "5bpw")


def concurrent_solves(requests: int, layers: int, workers: int, folder: Path) -> None:
    table = make_profile(layers, seed=1)
    expected = {b: plan_from_profile(table, [b]).model_dump_json() for b in BUDGETS}
    t0 = time.perf_counter()
    for b in BUDGETS:
        plan_from_profile(table, [b])
    local_s = (time.perf_counter() - t0) / len(BUDGETS)
    print(f"1. {requests} concurrent solves, {layers}-layer profile ({sum(len(x.options) for x in table.layers)} "
          f"options), server with {workers} solve workers")  # fmt: skip
    with spawned(folder, "--workers", str(workers)) as url:
        client = Client(url, timeout=600)
        pid = client.upload(table)
        client.solve(pid, [BUDGETS[0]])  # warm up

        def one(k: int) -> tuple[float, bool, str]:
            budget = BUDGETS[k % len(BUDGETS)]
            start = time.perf_counter()
            try:
                plan = client.solve(pid, [budget])
            except ServiceError as e:
                return time.perf_counter() - start, False, str(e)
            return time.perf_counter() - start, plan.model_dump_json() == expected[budget], ""

        barrier = threading.Barrier(min(requests, 64))

        def gated(k: int):
            if k < 64:
                barrier.wait()  # the first wave leaves together
            return one(k)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=requests) as pool:
            results = list(pool.map(gated, range(requests)))
        wall = time.perf_counter() - t0
    latencies = sorted(r[0] for r in results)
    failed = [r[2] for r in results if r[2]]
    same = sum(r[1] for r in results)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(f"   succeeded {requests - len(failed)}/{requests}; plans identical to the local solver's: {same}/{requests}")
    if failed:
        print(f"   first failure: {failed[0]}")
    print(f"   latency p50 {statistics.median(latencies):.2f}s  p99 {p99:.2f}s  max {latencies[-1]:.2f}s; "
          f"wall {wall:.1f}s = {requests / wall:.1f} solves/s (one local solve: {local_s * 1e3:.0f} ms)")  # fmt: skip


def restart_during_uploads(folder: Path, uploads: int = 40) -> None:
    print(f"\n2. restart in the middle of {uploads} uploads (SIGKILL, then a fresh server on the same folder)")
    tables = [make_profile(120, seed=100 + k) for k in range(uploads)]
    acknowledged: dict[int, str] = {}
    refused = 0
    with spawned(folder) as url:
        client = Client(url, timeout=30)
        pids = _server_pids(folder)
        if not pids:
            raise SystemExit(f"cannot find the server process serving {folder}")

        def upload(k: int) -> None:
            nonlocal refused
            try:
                acknowledged[k] = client.upload(tables[k])
            except ServiceError:
                refused += 1  # the server died under this request: not acknowledged, may be absent

        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(upload, k) for k in range(uploads)]
            while len(acknowledged) < uploads // 3 and not all(f.done() for f in futures):
                time.sleep(0.01)
            for pid in pids:
                _kill(pid)
            for f in futures:
                f.result()
    leftovers = list((folder / "profiles").glob(".*.tmp"))
    with spawned(folder) as url:
        client = Client(url)
        intact = sum(client.profile(pid) == tables[k] for k, pid in acknowledged.items())
    print(f"   acknowledged before the kill: {len(acknowledged)}; refused or cut off: {refused}")
    print(
        f"   after restart: {intact}/{len(acknowledged)} acknowledged profiles present and intact; "
        f"half-written files visible as profiles: 0 (temporary files left by the kill: {len(leftovers)})"
    )


def _server_pids(folder: Path) -> list[int]:
    import subprocess

    out = subprocess.run(["pgrep", "-f", "--", f"--data-dir {folder}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _kill(pid: int) -> None:
    import os

    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        concurrent_solves(args.requests, args.layers, args.workers, Path(tmp) / "a")
        restart_during_uploads(Path(tmp) / "b")


if __name__ == "__main__":
    main()
