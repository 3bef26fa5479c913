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
from torch import Tensor

from profilers.blocks import BlockCall
from profilers.cluster import Cluster
from profilers.input_hessians import BlockRecord, block_hessians
from profilers.shipped import ShippedBlock
from profilers.types import Choice

from .stored import StoredLayer, stored_layer

__all__ = ["RoundingTask", "round_block", "submit_rounding"]


@dataclass
class RoundingTask:
    """What a worker reads to round one block's planned layers (the batches travel once, beside it).

    Attributes:
        block: the block and its planned layers (`ShippedBlock`: the worker reads the weights
            from the model file, or the block travels when the model is held in memory).
        layers: per planned layer (model name): its target index, its choice, and the rows of a
            fractional choice's extra term.
        inputs, calls: the block's recorded input and call on each calibration batch.
        method, threads: the rounding, and the driver's torch threads (the same rounding as one process).
    """

    block: ShippedBlock
    layers: dict[str, tuple[int, Choice, np.ndarray | None]]
    inputs: list[Tensor]
    calls: list[BlockCall]
    method: str
    threads: int


def round_block(task: RoundingTask, batches: list[Any]) -> tuple[dict[str, StoredLayer], float]:
    """A worker's task: `H` of the block's planned layers from its recorded inputs, each layer
    rounded; what each stores, and the seconds it took."""
    started = time.perf_counter()
    with task.block.opened(task.threads) as (block, targets):
        sums = block_hessians(block, task.calls, task.inputs.__getitem__, batches, targets)
        stored = {}
        for name, (i, choice, rows) in task.layers.items():
            h = sums.get(i)
            stored[name] = stored_layer(targets[i].weight, choice, rows, task.method, None if h is None else h.float())
    return stored, time.perf_counter() - started


def submit_rounding(
    cluster: Cluster, record: BlockRecord, names: list[str], choices: dict[str, Choice],
    extra_rows: dict[str, np.ndarray] | None, method: str, batches: Any,
) -> None:  # fmt: skip
    """Hand the planned layers `names` of the block `record` holds to a worker (`round_block`);
    `batches`: the calibration batches' object-store reference."""
    index = {t.spec.name: i for i, t in record.targets.items()}
    shipped = ShippedBlock.of(record.block, {index[n]: record.targets[index[n]] for n in names})
    layers = {n: (index[n], choices[n], (extra_rows or {}).get(n)) for n in names}
    task = RoundingTask(shipped, layers, record.inputs, record.calls, method, torch.get_num_threads())
    nbytes = sum(t.numel() * t.element_size() for t in record.inputs) + shipped.nbytes
    cluster.submit(round_block, task, batches, nbytes=nbytes)
