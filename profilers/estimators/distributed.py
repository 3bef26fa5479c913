"""Scoring the blocks of a streamed profile on a Ray cluster (`FisherProfiler(ray=...)`).

The driver (this process) runs what is sequential: the recording pass, the head and the
gradient sweep that carries `dL/dh` back through the blocks (`segments`). Each block segment it
reaches is handed to Ray as one task instead of being scored here: the block's recorded inputs,
output-gradients and extra `H` go through Ray's object store, and the worker reads the block's
weights from the model file itself (a model read block by block, `allocator.sources.lazy`) or,
for a model held in memory, takes them from the object store too. The worker scores the block
with `scoring.SegmentScorer` (the code and inputs the driver would have used) and returns each
layer's `LayerSums`: the table is the single-process one, bit for bit. Workers run torch on as
many threads as the driver (how a product is split over threads may change its rounding).
Segments other than a block of Linear layers (head, stem, tied weights) are scored on the driver.

A worker that dies mid-task (killed, out of memory) has its task run again by Ray (up to
`RETRIES` times); the inputs are still in the object store, so the result is the same. At most
one task per worker CPU and one more are in flight: the driver waits before handing out more,
so the object store holds a bounded number of blocks.

Ray is an optional dependency (`pip install 'allocator[distributed]'`), imported only here.
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..capture import Call
from ..heap import release_freed_memory
from ..layers import QuantTarget
from ..quant.options import OptionLayout
from ..resident import block_reader
from ..types import LayerSpec, ProfileError
from .base import ProgressFn
from .fisher_sums import LayerSums
from .scoring import SegmentScorer, Terms
from .segments import Seen, Segment

__all__ = ["RETRIES", "ClusterStats", "RayScoring", "ray_missing"]

RETRIES = 3  # runs of a task after its worker died

_log = logging.getLogger(__name__)


def ray_missing() -> str:
    """The one line saying how to install Ray."""
    return "--ray needs Ray, an optional dependency: pip install 'allocator[distributed]'"


@dataclass
class BlockTask:
    """What a worker reads to score one block (the scored batches travel once, beside it)."""

    block: int
    segment: Segment
    specs: dict[int, LayerSpec]
    names: dict[int, str]  # each target's weight by parameter name inside the block
    dtypes: dict[int, torch.dtype]
    reader: Any  # block index -> the block's tensors (`allocator.sources.lazy.BlockFile`), or None
    layouts: dict[int, OptionLayout]
    states: dict[int, LayerSums]
    chunks: dict[int, int | None]
    method: str
    first_sample: list[int]
    pool_rows: bool
    threads: int
    weights: dict[str, Tensor] = field(default_factory=dict)  # without a reader: the weights themselves


def score_block(task: BlockTask, batches: list[Any]) -> tuple[dict[int, LayerSums], float]:
    """A worker's task: the block's layers scored into their `LayerSums`, and the seconds it took."""
    started = time.perf_counter()
    torch.set_num_threads(task.threads)
    tensors = task.weights or task.reader(task.block)
    targets = {
        i: QuantTarget(spec, nn.Parameter(tensors[task.names[i]].to(task.dtypes[i]), requires_grad=False),
                       [nn.Linear(spec.cols, spec.rows, bias=False, device="meta")])
        for i, spec in task.specs.items()
    }  # fmt: skip
    del tensors
    scorer = SegmentScorer(targets, task.layouts, task.method, batches, task.first_sample,
                           dict.fromkeys(targets, 1), {}, {}, task.pool_rows)  # fmt: skip
    for i in task.segment.targets:
        scorer.score(i, task.segment, task.chunks.get(i), task.states[i], Terms(1))
    release_freed_memory()
    return task.states, time.perf_counter() - started


@dataclass
class ClusterStats:
    """What a profile's blocks cost on the cluster, logged (`extra={"stats": ...}`) when it ends.

    Attributes:
        workers: CPUs of the cluster (tasks run at once).
        task_bytes: per task, the bytes of the tensors it carried (inputs, gradients, `H`, weights).
        task_seconds: per task, the seconds the worker scored for (its last run).
        handout_seconds: per task, the driver's seconds handing it out (serialising it into the
            object store, and waiting for room when every worker was busy is not counted).
    """

    workers: int
    task_bytes: list[int] = field(default_factory=list)
    task_seconds: list[float] = field(default_factory=list)
    handout_seconds: list[float] = field(default_factory=list)

    def summary(self) -> str:
        if not self.task_bytes:
            return f"ray: no block was scored on the cluster ({self.workers} workers); the model has no chain of blocks"
        mb = statistics.mean(self.task_bytes) / 2**20
        return (f"ray: {len(self.task_bytes)} blocks scored on {self.workers} workers, {mb:.0f} MB moved per block,"
                f" {statistics.median(self.task_seconds):.1f} s per task (median),"
                f" {statistics.mean(self.handout_seconds):.2f} s handing each out")  # fmt: skip


class RayScoring:
    """Block segments scored as Ray tasks (see the module docstring).

    Args:
        address: `local` (a cluster started here, one worker per CPU), `local:N` (N workers), or
            what `ray.init` takes to join a running cluster (`auto`, `HOST:PORT`, `ray://HOST:PORT`).
        report: the profile's progress callback; the stage `ray tasks` counts done / handed out.

    Raises:
        ProfileError: Ray is not installed, or the cluster at `address` cannot be reached.
    """

    def __init__(self, address: str, report: ProgressFn) -> None:
        try:
            import ray
        except ImportError:
            raise ProfileError(ray_missing()) from None
        self.ray = ray
        self.report = report
        self.started = _connect(ray, address)
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._remote = ray.remote(max_retries=RETRIES)(score_block)
        self._pending: dict[Any, list[int]] = {}
        self._batches: Any = None
        self.submitted = self.done = 0
        self.stats = ClusterStats(self.workers)
        self.results: dict[int, LayerSums] = {}

    def takes(self, segment: Segment, scorer: SegmentScorer) -> bool:
        """Whether `segment` is one block of Linear layers, each called in it alone."""
        return segment.name.startswith("block ") and all(
            scorer.segments_of[i] == 1 and all(isinstance(m, nn.Linear) for m in scorer.targets[i].modules)
            for i in segment.targets
        )

    def submit(
        self, segment: Segment, block: nn.Module, scorer: SegmentScorer, chunks: dict[int, int | None],
        states: list[LayerSums],
    ) -> None:  # fmt: skip
        """Hand block segment `segment` (of module `block`) to a worker."""
        while len(self._pending) > self.workers:
            self._collect(wait=True)
        if self._batches is None:
            self._batches = self.ray.put(list(scorer.batches))
        in_block = {id(p): n for n, p in block.named_parameters()}
        found = block_reader(block)
        task = BlockTask(
            block=found[1] if found else -1,
            segment=_portable(segment),
            specs={i: scorer.targets[i].spec for i in segment.targets},
            names={i: in_block[id(scorer.targets[i].weight)] for i in segment.targets},
            dtypes={i: scorer.targets[i].weight.dtype for i in segment.targets},
            reader=found[0] if found else None,
            layouts={i: scorer.layouts[i] for i in segment.targets},
            states={i: states[i] for i in segment.targets},
            chunks={i: chunks.get(i) for i in segment.targets},
            method=scorer.method,
            first_sample=list(scorer.first_sample),
            pool_rows=scorer.pool_rows,
            threads=torch.get_num_threads(),
        )
        if found is None:  # a model in memory: its weights travel with the task
            task.weights = {task.names[i]: scorer.targets[i].weight.detach() for i in segment.targets}
        self.stats.task_bytes.append(_payload_bytes(task))
        started = time.perf_counter()
        self._pending[self._remote.remote(task, self._batches)] = list(segment.targets)
        self.stats.handout_seconds.append(time.perf_counter() - started)
        self.submitted += 1
        self.report("ray tasks", self.done, self.submitted)
        self._collect(wait=False)

    def gather(self) -> dict[int, LayerSums]:
        """Wait for every task; the `LayerSums` of every layer scored on the cluster."""
        while self._pending:
            self._collect(wait=True)
        _log.info(self.stats.summary(), extra={"stats": self.stats})
        return self.results

    def close(self) -> None:
        """Leave the cluster (and stop it when it was started here)."""
        self._pending.clear()
        if self.started:
            self.ray.shutdown()

    def _collect(self, *, wait: bool) -> None:
        ready, _ = self.ray.wait(list(self._pending), num_returns=1, timeout=None if wait else 0)
        for ref in ready:
            del self._pending[ref]
            try:
                states, seconds = self.ray.get(ref)
            except self.ray.exceptions.RayTaskError as e:
                raise e.as_instanceof_cause() from None
            except self.ray.exceptions.WorkerCrashedError:
                raise ProfileError(f"a Ray worker died {RETRIES + 1} times scoring one block; see the cluster's"
                                   " logs (out of memory? lower --max-memory)") from None  # fmt: skip
            self.results.update(states)
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


def _portable(segment: Segment) -> Segment:
    """The segment with each call's module replaced by a weightless stand-in of its shape (what
    scoring reads of a module is its kind), so that no weight travels with the calls."""
    stand_ins: dict[int, nn.Module] = {}

    def stand_in(m: nn.Module) -> nn.Module:
        if id(m) not in stand_ins:
            stand_ins[id(m)] = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")  # type: ignore[arg-type]
        return stand_ins[id(m)]

    seen = [[Seen(Call(s.call.target, stand_in(s.call.module), s.call.inp, s.call.out), s.grads) for s in batch]
            for batch in segment.seen]  # fmt: skip
    return Segment(segment.name, segment.targets, seen, {}, segment.extra)


def _payload_bytes(task: BlockTask) -> int:
    """Bytes of the tensors a task carries (inputs counted once where calls share one)."""
    tensors = {id(t): t for batch in task.segment.seen for s in batch for t in (s.call.inp, *s.grads)}
    tensors.update({id(h): h for h in task.segment.extra.values()})
    tensors.update({id(w): w for w in task.weights.values()})
    return sum(t.numel() * t.element_size() for t in tensors.values())
