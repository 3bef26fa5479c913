"""Scoring the blocks of a streamed profile on a Ray cluster (`FisherProfiler(ray=...)`).

The driver (this process) runs what is sequential: the recording pass, the head and the
gradient sweep that carries `dL/dh` back through the blocks, last to first (`segments`). For each
block it reaches, it hands Ray one task carrying the block's recorded inputs, its calls and the
output-gradients `dL/dh` per draw, and the inputs of the batches only GPTQ's `H` reads
(`replay.BlockInputs`): hidden states at the block's boundary, not every layer's activations
(SmolLM2: about 60 MB per block instead of 230). The worker reads the block's weights from the
model file itself (a model read block by block: `allocator.sources.lazy.BlockFile`) or, for a
model held in memory, takes the block from the task; it replays the block exactly as the driver's
segment pass would (`replay.replay_block`, `block_hessians`), scores its layers with
`scoring.SegmentScorer` and returns each layer's `LayerSums`. The table is the single-process
one, bit for bit: same code, same inputs, and workers run torch on as many threads as the
driver (how a product is split over threads may change its rounding). Segments other than a
block of Linear layers (head, stem, tied weights) are scored on the driver.

Inputs travel in float32. Rounded to bfloat16 (inputs and gradients), the scores of a random
4-block Llama moved by 10% relative (median; up to 170%: GPTQ rounds differently on the changed
`H`), where a distributed profile may differ by none.

Tasks go through `profilers.cluster.Cluster` (bounded tasks in flight, a killed worker's task
run again by Ray: the same result).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..cluster import Cluster
from ..input_hessians import block_hessians
from ..quant.options import OptionLayout
from ..shipped import ShippedBlock
from .fisher_sums import LayerSums
from .replay import BlockInputs, Segment, replay_block
from .scoring import SegmentScorer, Terms

__all__ = ["BlockTask", "score_block", "submit_block"]


@dataclass
class BlockTask:
    """What a worker reads to score one block (the batches travel once, beside it).

    Attributes:
        block: the block and its layers (`ShippedBlock`: the worker reads the weights from the
            model file, or the block travels when the model is held in memory).
        inputs: the block's recorded inputs, calls and output-gradients (`replay.BlockInputs`).
        layouts, states, chunks: per layer, its options on its error stack, its running sums so
            far (empty) and the rows per error-stack chunk (the driver's memory plan).
        method, first_sample, draws, pool_rows: the rounding, each batch's first sample index,
            the pseudo-label draws and the pooling of rows (as the driver scores).
        threads: the driver's torch threads (the same rounding as one process).
    """

    block: ShippedBlock
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
    (`replay.replay_block`, `block_hessians`), its layers scored into their `LayerSums`; and the
    seconds it took."""
    started = time.perf_counter()
    with task.block.opened(task.threads) as (block, targets):
        wanted, inputs = set(targets), task.inputs
        segment = Segment(f"block {task.block.k}", list(targets))
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
    return task.states, time.perf_counter() - started


def submit_block(
    cluster: Cluster, segment: Segment, block: nn.Module, scorer: SegmentScorer, chunks: dict[int, int | None],
    states: list[LayerSums], batches: Any, draws: int,
) -> None:  # fmt: skip
    """Hand the segment of block module `block` (carrying `inputs`: `SegmentPasses(ship_blocks=True)`)
    to a worker; `batches`: the object-store references of the scored batches and the extra ones.
    Its result: the `LayerSums` of the block's layers (`score_block`)."""
    if segment.inputs is None:
        raise ValueError(f"segment {segment.name} carries no inputs to replay the block elsewhere")
    shipped = ShippedBlock.of(block, {i: scorer.targets[i] for i in segment.targets})
    task = BlockTask(
        block=shipped,
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
    cluster.submit(score_block, task, *batches, nbytes=segment.inputs.nbytes + shipped.nbytes)
