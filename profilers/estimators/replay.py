"""What a segment of the model holds for scoring (`Seen` calls, `Segment`, `BlockInputs`), and
replaying one block from its recorded input with `dL/dh` carried back through it
(`replay_block`, `carry_back`): the driver's segment pass and a Ray worker (`distributed`) run
this same code, so they see the same inputs and gradients."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..blocks import BlockCall
from ..capture import Call, capture_calls
from ..layers import QuantTarget

__all__ = ["BlockInputs", "Seen", "Segment", "carry_back", "replay_block"]


@dataclass
class Seen:
    """One call of a quantizable layer on one batch: the call (input kept, output dropped) and
    its output-gradient per pseudo-label draw."""

    call: Call
    grads: list[Tensor]


@dataclass
class Segment:
    """A part of the model whose layers are scored together.

    Attributes:
        name: "model" (not cut), "head", "block k" or "stem".
        targets: indices of the layers called in it.
        seen: per calibration batch, every call of those layers.
    """

    name: str
    targets: list[int]
    seen: list[list[Seen]] = field(default_factory=list)
    hessians: dict[tuple, Tensor | None] = field(default_factory=dict)  # the last `H` built, by its inputs
    extra: dict[int, Tensor] = field(default_factory=dict)  # per target, `H` of the batches only `H` reads
    inputs: BlockInputs | None = None  # a block scored elsewhere: what replaying it needs (no `seen`, no `extra`)
    block: int | None = None  # a block segment: the block's index in the chain


@dataclass
class BlockInputs:
    """What replaying block `k` elsewhere needs to see what its segment would (`replay_block`,
    `input_hessians.block_hessians`): per scored batch its recorded input, call and output-gradient per draw;
    per batch only `H` reads, its input and call."""

    inputs: list[Tensor]
    calls: list[BlockCall]
    grads: list[list[Tensor]]
    extra_inputs: list[Tensor]
    extra_calls: list[BlockCall]

    @property
    def nbytes(self) -> int:
        """Bytes of the hidden states and gradients (the calls' small tensors left out)."""
        tensors = [*self.inputs, *(g for grads in self.grads for g in grads), *self.extra_inputs]
        return sum(t.numel() * t.element_size() for t in tensors)


def replay_block(
    block: nn.Module,
    calls: Sequence[BlockCall],
    input_of: Callable[[int], Tensor],
    batches: Sequence[Any],
    targets: Sequence[QuantTarget] | Mapping[int, QuantTarget],
    wanted: set[int],
    grads: Sequence[list[Tensor]],
    draws: int,
) -> Iterator[tuple[list[Seen], list[Tensor]]]:
    """Per batch, `block` run from its recorded input (`input_of(b)`) with `dL/dh` at its output
    (`grads[b]`, per draw) carried back: the calls of the `wanted` targets as `Seen`, and `dL/dh`
    at its input."""
    for b, batch in enumerate(batches):
        leaf = input_of(b).detach().requires_grad_(True)
        with capture_calls(targets, batch) as captured, torch.enable_grad():
            h = calls[b].call(block, leaf)
        mine = [c for c in captured if c.target in wanted]
        yield carry_back(h, leaf, mine, grads[b].__getitem__, draws)
        del captured, h, mine


def carry_back(
    out: Tensor, leaf: Tensor | None, calls: list[Call], grad_out: Callable[[int], Tensor], draws: int
) -> tuple[list[Seen], list[Tensor]]:
    """For each draw `d`, the gradient `grad_out(d)` at `out` carried back to every call's output
    and, when given, to `leaf` (the segment's input): the calls as `Seen`, and the gradient at
    `leaf` per draw."""
    seen = [Seen(_kept(c), []) for c in calls]
    inputs = ([leaf] if leaf is not None else []) + [c.out for c in calls]
    at_leaf = []
    for d in range(draws):
        grads = torch.autograd.grad(out, inputs, grad_outputs=grad_out(d), retain_graph=d < draws - 1,
                                    allow_unused=True)  # fmt: skip
        if leaf is not None:
            at_leaf.append(_or_zeros(grads[0], leaf))
            grads = grads[1:]
        for s, g, c in zip(seen, grads, calls, strict=True):
            s.grads.append(_or_zeros(g, c.out))
    return seen, at_leaf


def _kept(call: Call) -> Call:
    """The call with its input detached and its output dropped: a shape on the meta device, not
    a view that would keep the output's memory alive."""
    return Call(call.target, call.module, call.inp.detach(), call.out.detach().to("meta"))


def _or_zeros(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like, dtype=torch.float32) if g is None else g
