"""Input second moments `H = Σ x xᵀ` of the quantizable layers, from one forward pass.

What GPTQ needs per layer. Positions a batch's `attention_mask` marks as padding are left out
(they are computed but never reach the output). Linear layers and ungrouped convolutions
(over their input patches) get one; embeddings and grouped convolutions do not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .blocks import BlockCall, Chain, NotAChain, find_blocks
from .capture import Call, capture_calls, conv_patches
from .layers import QuantTarget
from .resident import held
from .tasks import Task

__all__ = [
    "BlockRecord", "accumulate_hessians", "block_hessians", "call_hessian", "input_hessians", "positions_mask",
    "streamed_hessians",
]  # fmt: skip


def positions_mask(batch: Any, inp: Tensor) -> Tensor | None:
    """1 at each real position of a `[batch, positions, width]` input, 0 at padding, flattened
    (float32); None when the batch has no attention mask of that shape."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if isinstance(mask, Tensor) and inp.dim() == 3 and tuple(mask.shape) == tuple(inp.shape[:2]):
        return mask.reshape(-1).to(torch.float32)
    return None


def input_hessians(
    model: nn.Module,
    batches: Sequence[Any],
    task: Task,
    targets: Sequence[QuantTarget],
    *,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[int, Tensor]:
    """Per target index (Linear, or Conv2d with groups=1), `H` `[cols, cols]` in float32."""
    report = progress or (lambda stage, done, total: None)
    sums: dict[int, Tensor] = {}
    with torch.no_grad():
        for b, batch in enumerate(batches):
            report("hessians", b, len(batches))
            with capture_calls(targets, batch, isolate=False) as calls:
                task.forward(model, batch)
            accumulate_hessians(sums, calls, batch)
    report("hessians", len(batches), len(batches))
    return {i: h.float() for i, h in sums.items()}


def streamed_hessians(
    model: nn.Module,
    batches: Sequence[Any],
    task: Task,
    targets: Sequence[QuantTarget],
    *,
    sequential: bool = False,
    ship: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> Iterator[dict[int, Tensor] | BlockRecord]:
    """`input_hessians` one block at a time (`profilers.blocks`): first the layers outside the
    blocks, from one forward pass that also records every block's input, then each block's
    layers. Only one block's `H` is held at a time; a model without a chain of blocks gets
    every `H` at once.

    The caller may quantize the layers of each group it receives before asking for the next.
    With `sequential`, that is what the next `H` sees: each block runs on the output of the
    (quantized) blocks before it, and its layers come in groups in call order, the layers fed
    one input together (q/k/v, then o, then gate/up, then down), each group's `H` taken after
    the groups before it were quantized (GPTQ's sequential calibration). Otherwise every block
    runs on its recorded full-precision input and its layers come as one group; with `ship`
    (not sequential), each block comes as a `BlockRecord` instead, for its `H` to be taken
    elsewhere (`allocator.quantized.distributed`).
    """
    report = progress or (lambda stage, done, total: None)
    blocks = find_blocks(model, targets)
    if not blocks:
        yield input_hessians(model, batches, task, targets, progress=progress)
        return
    chain = Chain(blocks)
    inside = {id(m) for block in blocks for m in block.modules()}
    in_blocks = {i for i, t in enumerate(targets) if all(id(m) in inside for m in t.modules)}
    outside: dict[int, Tensor] = {}
    total = len(batches) + len(blocks)
    try:
        with torch.no_grad():
            for b, batch in enumerate(batches):
                report("hessians", b, total)
                with chain.recording(), capture_calls(targets, batch, isolate=False, shapes_only=in_blocks) as calls:
                    task.forward(model, batch)
                accumulate_hessians(outside, [c for c in calls if c.target not in in_blocks], batch)
    except NotAChain:
        yield input_hessians(model, batches, task, targets, progress=progress)
        return
    yield {i: h.float() for i, h in outside.items()}
    # Sequential calibration carries each batch's hidden state through the quantized blocks; otherwise every
    # block reads its recorded input (a model read block by block keeps them in its spill file, not here).
    hidden = [chain.input(b, 0) for b in range(len(batches))] if sequential else []
    for k, block in enumerate(blocks):
        report("hessians", len(batches) + k, total)
        if ship and not sequential:
            n = len(batches)
            here = {id(m) for m in block.modules()}
            mine = {i: targets[i] for i in in_blocks if all(id(m) in here for m in targets[i].modules)}
            calls, inputs = [chain.calls[b][k] for b in range(n)], [chain.input(b, k) for b in range(n)]
            yield BlockRecord(k, block, mine, calls, inputs)
            chain.free(k)
            continue
        with held(block):  # a block read on use stays in memory while its layers are quantized
            yield from _block_hessians(chain, k, batches, targets, sequential, hidden)
    report("hessians", total, total)


@dataclass
class BlockRecord:
    """Block `k` (the module `block`, holding `targets`) with its recorded call and input on every
    calibration batch: what taking its layers' `H` elsewhere needs (`block_hessians`)."""

    k: int
    block: nn.Module
    targets: dict[int, QuantTarget]  # the targets inside the block, by index
    calls: list[BlockCall]
    inputs: list[Tensor]


def _block_hessians(
    chain: Chain, k: int, batches: Sequence[Any], targets: Sequence[QuantTarget], sequential: bool, hidden: list[Any]
) -> Iterator[dict[int, Tensor]]:
    """Block `k`'s groups of `streamed_hessians`; with `sequential`, `hidden` (each batch's input
    to the block) becomes the block's output as its layers then are."""
    block = chain.blocks[k]
    if not sequential:
        calls = [chain.calls[b][k] for b in range(len(batches))]
        sums = block_hessians(block, calls, lambda b: chain.input(b, k), batches, targets)
        chain.free(k)
        yield {i: h.float() for i, h in sums.items()}
        return
    done: set[int] = set()
    while True:  # one run of the block per group of layers, and a last one for its output
        sums, group, outs = {}, None, []
        with torch.no_grad():
            for b, batch in enumerate(batches):
                with capture_calls(targets, batch, isolate=False) as calls:
                    outs.append(chain.calls[b][k].call(block, hidden[b]))
                group = _next_group(calls, done) if group is None else group
                accumulate_hessians(sums, [c for c in calls if c.target in group], batch)
        if not group:
            hidden[:] = outs
            break
        done |= group
        yield {i: h.float() for i, h in sums.items()}
    chain.free(k)


def block_hessians(
    block: nn.Module,
    calls: Sequence[BlockCall],
    input_of: Callable[[int], Tensor],
    batches: Sequence[Any],
    targets: Sequence[QuantTarget] | Mapping[int, QuantTarget],
    wanted: set[int] | None = None,
) -> dict[int, Tensor]:
    """`H` (float64) of the targets in `block` (the `wanted` ones; all when None), from running it
    on each batch's recorded input (`input_of(b)`, with its recorded call `calls[b]`)."""
    sums: dict[int, Tensor] = {}
    with torch.no_grad():
        for b, batch in enumerate(batches):
            with capture_calls(targets, batch, isolate=False) as captured:
                calls[b].call(block, input_of(b))
            accumulate_hessians(sums, [c for c in captured if wanted is None or c.target in wanted], batch)
    return sums


def _next_group(calls: Sequence[Call], done: set[int]) -> set[int]:
    """The layers of the first call not yet done, with every other layer fed the same input."""
    first = next((c for c in calls if c.target not in done), None)
    if first is None:
        return set()
    return {c.target for c in calls if c.target not in done and c.inp is first.inp}


def accumulate_hessians(sums: dict[int, Tensor], calls: Sequence[Call], batch: Any) -> None:
    """Add each call's `Σ x xᵀ` to its target's sum, once per distinct input: the targets fed one
    input (q, k and v) share one sum while they keep being fed one input, and a sum no other
    target holds is added to in place (an 8192-wide `H` is 0.5 GB in float64: one sum and one
    batch's term at a time, not three copies)."""
    fed: dict[tuple[int, int | None], tuple[Call, list[int]]] = {}
    for call in calls:
        key = (id(call.inp), None if isinstance(call.module, nn.Linear) else id(call.module))
        fed.setdefault(key, (call, []))[1].append(call.target)
    for call, targets in fed.values():
        h = call_hessian(call, batch)
        if h is None:
            continue
        held = [sums.get(t) for t in targets]
        mine = held[0]
        others = (v for t, v in sums.items() if t not in targets)
        alone = len(set(targets)) == len(targets)  # (a target called twice on one input adds it twice)
        if mine is not None and alone and all(v is mine for v in held) and all(v is not mine for v in others):
            mine.add_(h)
            continue
        for t in targets:
            sums[t] = sums[t] + h if t in sums else h


def call_hessian(call: Call, batch: Any) -> Tensor | None:
    """`Σ x xᵀ` (float64) over the positions of one call of a Linear or ungrouped Conv2d (padding
    left out); None for other modules."""
    mod = call.module
    if isinstance(mod, nn.Linear):
        x = call.inp.detach().reshape(-1, call.inp.shape[-1]).double()
        mask = positions_mask(batch, call.inp)
        if mask is not None:
            x = x * mask.double().unsqueeze(1)
    elif isinstance(mod, nn.Conv2d) and mod.groups == 1:
        cols = conv_patches(mod, call.inp.detach().float())
        x = cols.transpose(1, 2).reshape(-1, cols.shape[1]).double()
    else:
        return None
    return x.T @ x
