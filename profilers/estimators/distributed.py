"""Scoring the blocks of a streamed profile on a Ray cluster (`FisherProfiler(ray=...)`).

The driver (this process) runs what is sequential: the recording pass, the head and the
gradient sweep that carries `dL/dh` back through the blocks, last to first (`segments`). For each
block it reaches, it hands Ray one task carrying the block's recorded inputs, its calls and the
output-gradients `dL/dh` per draw, and the inputs of the batches only GPTQ's `H` reads
(`segments.BlockInputs`): hidden states at the block's boundary, not every layer's activations
(SmolLM2: about 60 MB per block instead of 230). The worker reads the block's weights from the
model file itself (a model read block by block: `allocator.sources.lazy.BlockFile`) or, for a
model held in memory, takes the block from the task; it replays the block exactly as the driver's
segment pass would (`segments.replay_block`, `block_hessians`), scores its layers with
`scoring.SegmentScorer` and returns each layer's `LayerSums`. The table is the single-process
one, bit for bit: same code, same inputs, and workers run torch on as many threads as the
driver (how a product is split over threads may change its rounding). Segments other than a
block of Linear layers (head, stem, tied weights) are scored on the driver.

Inputs travel in float32. Rounded to bfloat16 (inputs and gradients), the scores of a random
4-block Llama moved by 10% relative (median; up to 170%: GPTQ rounds differently on the changed
`H`), where a distributed profile may differ by none.

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
from torch import nn

from ..heap import release_freed_memory
from ..layers import QuantTarget
from ..quant.options import OptionLayout
from ..resident import block_reader
from ..types import LayerSpec, ProfileError
from .base import ProgressFn
from .fisher_sums import LayerSums
from .scoring import SegmentScorer, Terms
from .segments import BlockInputs, Segment, block_hessians, replay_block

__all__ = ["RETRIES", "ClusterStats", "RayScoring", "ray_missing"]

RETRIES = 3  # runs of a task after its worker died

_log = logging.getLogger(__name__)


def ray_missing() -> str:
    """The one line saying how to install Ray."""
    return "--ray needs Ray, an optional dependency: pip install 'allocator[distributed]'"


@dataclass
class BlockTask:
    """What a worker reads to score block `block` (the batches travel once, beside it).

    Attributes:
        module: the block itself, weights included (a model held in memory), or None: the
            worker builds it and reads its weights with `reader` (`allocator.sources.lazy.BlockFile`).
        targets: per target index, its module's name inside the block and its spec.
        inputs: the block's recorded inputs, calls and output-gradients (`segments.BlockInputs`).
    """

    block: int
    module: nn.Module | None
    reader: Any
    targets: dict[int, tuple[str, LayerSpec]]
    inputs: BlockInputs
    layouts: dict[int, OptionLayout]
    states: dict[int, LayerSums]
    chunks: dict[int, int | None]
    method: str
    first_sample: list[int]
    draws: int
    pool_rows: bool
    threads: int


def score_block(task: BlockTask, batches: list[Any], extra: list[Any]) -> tuple[dict[int, LayerSums], float]:
    """A worker's task: the block replayed from its inputs as the driver's segment pass runs it
    (`segments.replay_block`, `block_hessians`), its layers scored into their `LayerSums`; and the
    seconds it took."""
    started = time.perf_counter()
    torch.set_num_threads(task.threads)
    block = task.module if task.module is not None else task.reader.block(task.block)
    try:
        modules = {i: block.get_submodule(name) for i, (name, _) in task.targets.items()}
        targets = {i: QuantTarget(spec, modules[i].weight, [modules[i]]) for i, (_, spec) in task.targets.items()}
        wanted, inputs = set(targets), task.inputs
        segment = Segment(f"block {task.block}", list(targets))
        for seen, _ in replay_block(block, inputs.calls, inputs.inputs.__getitem__, batches, targets, wanted,
                                    inputs.grads, task.draws):  # fmt: skip
            segment.seen.append(seen)
        if inputs.extra_inputs:
            segment.extra = block_hessians(block, inputs.extra_calls, inputs.extra_inputs.__getitem__, extra, targets,
                                           wanted)  # fmt: skip
        scorer = SegmentScorer(targets, task.layouts, task.method, batches, task.first_sample,
                               dict.fromkeys(targets, 1), {}, {}, task.pool_rows)  # fmt: skip
        for i in segment.targets:
            scorer.score(i, segment, task.chunks.get(i), task.states[i], Terms(1))
    finally:
        if task.module is None:
            task.reader.release(block)
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

    def submit(
        self, segment: Segment, block: nn.Module, k: int, scorer: SegmentScorer, chunks: dict[int, int | None],
        states: list[LayerSums], extra: list[Any], draws: int,
    ) -> None:  # fmt: skip
        """Hand block `k`'s segment (carrying `inputs`: `SegmentPasses(ship_blocks=True)`) to a worker."""
        if segment.inputs is None:
            raise ValueError(f"segment {segment.name} carries no inputs to replay the block elsewhere")
        while len(self._pending) > self.workers:
            self._collect(wait=True)
        if self._batches is None:
            self._batches = (self.ray.put(list(scorer.batches)), self.ray.put(list(extra)))
        names = {id(m): n for n, m in block.named_modules()}
        found = block_reader(block)
        task = BlockTask(
            block=k,
            module=None if found else block,
            reader=found[0] if found else None,
            targets={i: (names[id(scorer.targets[i].modules[0])], scorer.targets[i].spec) for i in segment.targets},
            inputs=segment.inputs,
            layouts={i: scorer.layouts[i] for i in segment.targets},
            states={i: states[i] for i in segment.targets},
            chunks={i: chunks.get(i) for i in segment.targets},
            method=scorer.method,
            first_sample=list(scorer.first_sample),
            draws=draws,
            pool_rows=scorer.pool_rows,
            threads=torch.get_num_threads(),
        )
        self.stats.task_bytes.append(_payload_bytes(task))
        started = time.perf_counter()
        self._pending[self._remote.remote(task, *self._batches)] = list(segment.targets)
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


def _payload_bytes(task: BlockTask) -> int:
    """Bytes of the tensors a task carries: recorded inputs, output-gradients, the block's weights
    when they travel with it (the calls' small tensors, e.g. rotary tables, left out)."""
    inputs = task.inputs
    tensors = [*inputs.inputs, *(g for grads in inputs.grads for g in grads), *inputs.extra_inputs]
    if task.module is not None:
        tensors += list(task.module.parameters())
    return sum(t.numel() * t.element_size() for t in tensors)
