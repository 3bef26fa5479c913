"""Rounding a plan's blocks on a Ray cluster (`apply --ray`): the task that rounds one block's
planned layers on a worker.

GPTQ's rounding of a layer needs only its weight and its `H`; the layers of a block are
independent given the block's inputs. The driver runs the recording pass (one forward pass per
calibration batch, each block's input kept: `profilers.input_hessians.streamed_hessians` with
`ship=True`) and hands each block to a worker with its recorded inputs and calls; the worker
reads the block's weights from the model file (or takes the in-memory block from the task),
takes `H` of its layers by running the block on those inputs (`block_hessians`, as the driver
would), and returns what each layer stores (`StoredLayer`): the same values as one process,
so the same packed file.

Sequential calibration (`--sequential`) runs each block on the quantized blocks before it: block
`k`'s `H` exists only once blocks `0..k-1` are rounded, so it stays on the driver.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from profilers.blocks import BlockCall
from profilers.cluster import Cluster
from profilers.heap import release_freed_memory
from profilers.input_hessians import BlockRecord, block_hessians
from profilers.layers import QuantTarget
from profilers.resident import block_reader
from profilers.types import Choice, LayerSpec

from .stored import StoredLayer, stored_layer

__all__ = ["RoundingTask", "round_block", "submit_rounding"]


@dataclass
class RoundingTask:
    """What a worker reads to round block `block`'s planned layers (the batches travel once, beside it).

    Attributes:
        module: the block itself, weights included (a model held in memory), or None: the worker
            builds it and reads its weights with `reader` (`allocator.sources.lazy.BlockFile`).
        layers: per planned layer (model name): its module's name inside the block, its target
            index and spec, its choice, and the rows of a fractional choice's extra term.
        inputs, calls: the block's recorded input and call on each calibration batch.
    """

    block: int
    module: nn.Module | None
    reader: Any
    layers: dict[str, tuple[str, int, LayerSpec, Choice, np.ndarray | None]]
    inputs: list[Tensor]
    calls: list[BlockCall]
    method: str
    threads: int


def round_block(task: RoundingTask, batches: list[Any]) -> tuple[dict[str, StoredLayer], float]:
    """A worker's task: `H` of the block's planned layers from its recorded inputs, each layer
    rounded; what each stores, and the seconds it took."""
    started = time.perf_counter()
    torch.set_num_threads(task.threads)
    block = task.module if task.module is not None else task.reader.block(task.block)
    try:
        modules = {i: block.get_submodule(inner) for inner, i, *_ in task.layers.values()}
        targets = {i: QuantTarget(spec, modules[i].weight, [modules[i]]) for _, i, spec, *_ in task.layers.values()}
        sums = block_hessians(block, task.calls, task.inputs.__getitem__, batches, targets)
        stored = {}
        for name, (_, i, _, choice, rows) in task.layers.items():
            h = sums.get(i)
            stored[name] = stored_layer(modules[i].weight, choice, rows, task.method, None if h is None else h.float())
    finally:
        if task.module is None:
            task.reader.release(block)
        release_freed_memory()
    return stored, time.perf_counter() - started


def submit_rounding(
    cluster: Cluster, record: BlockRecord, names: list[str], targets: dict[str, tuple[int, QuantTarget]],
    choices: dict[str, Choice], extra_rows: dict[str, np.ndarray] | None, method: str, batches: Any,
) -> None:  # fmt: skip
    """Hand the planned layers `names` of the block `record` holds to a worker (`round_block`);
    `targets`: per layer name its target index and target; `batches`: their object-store reference."""
    inner = {id(m): n for n, m in record.block.named_modules()}
    found = block_reader(record.block)
    layers = {}
    for name in names:
        i, t = targets[name]
        layers[name] = (inner[id(t.modules[0])], i, t.spec, choices[name], (extra_rows or {}).get(name))
    task = RoundingTask(record.k, None if found else record.block, found[0] if found else None, layers,
                        record.inputs, record.calls, method, torch.get_num_threads())  # fmt: skip
    tensors = [*record.inputs, *([] if found else record.block.parameters())]
    cluster.submit(round_block, task, batches, nbytes=sum(t.numel() * t.element_size() for t in tensors))
