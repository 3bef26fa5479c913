"""A Ray cluster to hand tasks to, for the stages that fan out (`profile --ray`, `apply --ray`).

`Cluster(address)` starts one here (`local`, `local:N`) or joins a running one, hands out tasks
with at most one per worker CPU and one more in flight (the driver waits before handing out
more, so Ray's object store holds a bounded number of tasks' inputs), has a task whose worker
died run again (up to `RETRIES` times: its inputs are still in the object store, so its result
is the same), and collects results in the order they finish. Progress goes to the caller's
`(stage, done, total)` callback as tasks done / handed out; a summary of what the tasks moved and
cost is logged when they are gathered.

Ray is an optional dependency (`pip install 'allocator[distributed]'`), imported only here.
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .types import ProfileError

__all__ = ["RETRIES", "Cluster", "ClusterStats", "ray_missing"]

RETRIES = 3  # runs of a task after its worker died

_log = logging.getLogger(__name__)


def ray_missing() -> str:
    """The one line saying how to install Ray."""
    return "--ray needs Ray, an optional dependency: pip install 'allocator[distributed]'"


@dataclass
class ClusterStats:
    """What a stage's tasks cost on the cluster, logged (`extra={"stats": ...}`) when gathered.

    Attributes:
        cpus: CPUs of the cluster.
        threads: CPUs (torch threads) each task takes: `cpus // threads` tasks run at once.
        what: what the tasks did, in the summary ("blocks scored").
        task_bytes: per task, the bytes of the tensors it carried (inputs, gradients, weights).
        task_seconds: per task, the seconds the worker worked for (its last run).
        handout_seconds: per task, the driver's seconds handing it out (serialising it into the
            object store; waiting for room while every worker was busy is not counted).
    """

    cpus: int
    threads: int
    what: str
    task_bytes: list[int] = field(default_factory=list)
    task_seconds: list[float] = field(default_factory=list)
    handout_seconds: list[float] = field(default_factory=list)

    def summary(self) -> str:
        where = f"{self.cpus} CPUs, {self.threads} per task"
        if not self.task_bytes:
            return f"ray: no {self.what.split()[0]} went to the cluster ({where}): the model has no chain of blocks"
        mb = statistics.mean(self.task_bytes) / 2**20
        return (f"ray: {len(self.task_bytes)} {self.what} on {where}, {mb:.0f} MB moved per task,"
                f" {statistics.median(self.task_seconds):.1f} s per task (median),"
                f" {statistics.mean(self.handout_seconds):.2f} s handing each out")  # fmt: skip


class Cluster:
    """Tasks handed to a Ray cluster (see the module docstring).

    Args:
        address: `local` (a cluster started here, one worker per CPU), `local:N` (N workers), or
            what `ray.init` takes to join a running cluster (`auto`, `HOST:PORT`, `ray://HOST:PORT`).
        report: progress callback; the stage `ray tasks` counts tasks done / handed out.
        what: what the tasks do, for the summary ("blocks scored").
        threads: the threads each task computes on (as many as the driver's, so that its
            results are the driver's bit for bit); each task takes as many of the cluster's CPUs
            (at most a node's), so tasks sharing a node do not share its cores.

    Raises:
        ProfileError: Ray is not installed, or the cluster at `address` cannot be reached.
    """

    def __init__(
        self, address: str, report: Callable[[str, int, int], None], what: str = "tasks done", threads: int = 1
    ) -> None:
        try:
            import ray
        except ImportError:
            raise ProfileError(ray_missing()) from None
        self.ray = ray
        self.report = report
        self.started = _connect(ray, address)
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        largest = max((int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=cpus)
        self.cpus_per_task = max(1, min(threads, largest))  # a task asking more than any node has would never run
        self.workers = max(1, cpus // self.cpus_per_task)  # tasks at once
        self.stats = ClusterStats(cpus, self.cpus_per_task, what)
        self._remotes: dict[Callable[..., Any], Any] = {}
        self._pending: dict[Any, None] = {}
        self._results: list[Any] = []
        self.submitted = self.done = 0

    def put(self, value: Any) -> Any:
        """`value` in the object store once, for many tasks to read (a reference to pass them)."""
        return self.ray.put(value)

    def submit(self, task: Callable[..., tuple[Any, float]], *args: Any, nbytes: int = 0) -> None:
        """Run `task(*args)` on a worker; it returns (its result, the seconds it worked).
        `nbytes`: the bytes its arguments carry, for the summary."""
        while len(self._pending) > self.workers:
            self._collect(wait=True)
        if task not in self._remotes:
            self._remotes[task] = self.ray.remote(max_retries=RETRIES, num_cpus=self.cpus_per_task)(task)
        self.stats.task_bytes.append(nbytes)
        started = time.perf_counter()
        self._pending[self._remotes[task].remote(*args)] = None
        self.stats.handout_seconds.append(time.perf_counter() - started)
        self.submitted += 1
        self.report("ray tasks", self.done, self.submitted)
        self._collect(wait=False)

    def gather(self) -> list[Any]:
        """Wait for every task; their results, in the order they finished."""
        while self._pending:
            self._collect(wait=True)
        _log.info(self.stats.summary(), extra={"stats": self.stats})
        results, self._results = self._results, []
        return results

    def close(self) -> None:
        """Cancel the tasks still pending (after a failure) and leave the cluster (stopping it
        when it was started here)."""
        for ref in self._pending:
            self.ray.cancel(ref)
        self._pending.clear()
        if self.started:
            self.ray.shutdown()

    def _collect(self, *, wait: bool) -> None:
        ready, _ = self.ray.wait(list(self._pending), num_returns=1, timeout=None if wait else 0)
        for ref in ready:
            del self._pending[ref]
            try:
                result, seconds = self.ray.get(ref)
            except self.ray.exceptions.RayTaskError as e:  # the task raised: its own error
                raise e.as_instanceof_cause() from None
            except self.ray.exceptions.RayError as e:  # killed, out of memory, node or object lost
                why = type(e).__name__
                raise ProfileError(f"a Ray task failed {RETRIES + 1} times ({why}); see the cluster's logs (out of"
                                   " memory? lower --max-memory, or give the workers more)") from None  # fmt: skip
            self._results.append(result)
            self.stats.task_seconds.append(seconds)
            self.done += 1
            self.report("ray tasks", self.done, self.submitted)


def _connect(ray: Any, address: str) -> bool:
    """Join or start the cluster; whether this process started (or joined) it and so leaves it."""
    if ray.is_initialized():
        return False
    kind, _, count = address.partition(":")
    if kind == "local":
        if count and not count.isdigit():
            raise ProfileError(f"--ray {address!r}: local takes a number of workers (local:2), not {count!r}")
        cpus = int(count) if count else os.cpu_count() or 1
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="warning")
        return True
    _check_reachable(address)
    try:
        ray.init(address=address, log_to_driver=False, logging_level="warning")
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ProfileError(f"cannot join the Ray cluster at {address!r} ({e}); start one with `ray start --head`"
                           " there, or pass --ray local") from None  # fmt: skip
    return True


def _check_reachable(address: str) -> None:
    """A `HOST:PORT` address that accepts no connection is refused at once (`ray.init` retries for
    minutes); `auto` is left to Ray, which finds no cluster quickly."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        why = e.strerror or e
        raise ProfileError(f"cannot reach the Ray cluster at {address!r} ({why}); check the address (the head"
                           " node's HOST:PORT, default port 6379), or pass --ray local") from None  # fmt: skip
