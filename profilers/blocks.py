"""The repeated blocks of a model (decoder or encoder layers), and running one block at a time
from recorded inputs, so that a profiler holds one block's work in memory, not the model's.

A model is cut into a *stem* (everything before the first block: embeddings), a chain of
*blocks* (the largest `nn.ModuleList` of same-type modules holding quantizable layers, each
block's output the next one's input), and a *head* (everything after: final norm, LM head,
pooling). One forward pass per batch records each block's input; afterwards

- `head_pass` runs the model with every block replaced by its recorded output, the last one
  as a leaf the head's gradient reaches;
- `replay` runs one block from its recorded input;
- `stem_pass` runs the model up to the first block's input and stops.

The cut is checked on the first batch (each block called once, in order, each fed the previous
one's output, and the head pass giving the model's own output); a model that fails a check, or
has no such blocks, is one head segment: the whole model, as before streaming existed.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .layers import QuantTarget
from .resident import is_lazy

__all__ = ["BlockCall", "Chain", "NotAChain", "SpillFile", "Spilled", "blocks_holding", "find_blocks"]


def find_blocks(model: nn.Module, targets: Sequence[QuantTarget]) -> list[nn.Module]:
    """The longest `nn.ModuleList` of two or more modules of one type, each holding a target."""
    target_ids = {id(m) for t in targets for m in t.modules}
    return blocks_holding(model, lambda m: id(m) in target_ids)


def blocks_holding(model: nn.Module, wanted: Callable[[nn.Module], bool]) -> list[nn.Module]:
    """The longest `nn.ModuleList` of two or more modules of one type, each holding a module
    `wanted` accepts (`find_blocks` before the targets exist: e.g. every `nn.Linear`)."""
    best: list[nn.Module] = []
    for mod in model.modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2 or len(mod) <= len(best):
            continue
        kids = list(mod)
        if len({type(k) for k in kids}) == 1 and all(any(wanted(m) for m in k.modules()) for k in kids):
            best = kids
    return best


@dataclass
class BlockCall:
    """How a block was called on one batch, its hidden-state input left out: the positional
    arguments and keywords, where the hidden state goes (`slot`), and the shape of its output
    (`rest`: the other items when the block returns a tuple)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    slot: int | str
    rest: tuple[Any, ...] | None = None

    def call(self, block: nn.Module, hidden: Tensor, weights: dict[str, Tensor] | None = None) -> Tensor:
        """Run `block` on `hidden` with the recorded arguments; its hidden-state output. With
        `weights` (parameter name inside the block -> tensor), those tensors stand in for the
        block's own parameters for this call (`torch.func.functional_call`)."""
        args, kwargs = list(self.args), dict(self.kwargs)
        if isinstance(self.slot, int):
            args[self.slot] = hidden
        else:
            kwargs[self.slot] = hidden
        if weights:
            return _hidden_of(torch.func.functional_call(block, weights, tuple(args), kwargs))
        return _hidden_of(block(*args, **kwargs))

    def output(self, hidden: Tensor) -> Any:
        """What the block would return with `hidden` as its hidden-state output."""
        return hidden if self.rest is None else (hidden, *self.rest)


def _hidden_of(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
        return out[0]
    raise NotAChain(f"a block returned {type(out).__name__}, not a tensor or a tuple starting with one")


def _stateless(value: Any) -> Any:
    """None for a key/value cache (a transformers `Cache`), which a replayed block would append
    to, attending over the keys of every earlier call; anything else as it is."""
    kind = type(value)
    if kind.__module__.startswith("transformers") and "Cache" in kind.__name__:
        return None
    return value


class NotAChain(Exception):
    """The model does not split into stem, chain of blocks and head as `Chain` needs."""


class _Stop(Exception):
    def __init__(self, hidden: Tensor) -> None:
        self.hidden = hidden


def _hidden_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int | str, Tensor]:
    if args and isinstance(args[0], Tensor):
        return 0, args[0]
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return "hidden_states", kwargs["hidden_states"]
    raise NotAChain("a block's first argument is not its hidden state")


class Spilled:
    """A tensor written to a `SpillFile`, read back (into new memory) by `load`."""

    def __init__(self, file: SpillFile, offset: int, shape: torch.Size, dtype: torch.dtype) -> None:
        self.file, self.offset, self.shape, self.dtype = file, offset, shape, dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def load(self) -> Tensor:
        data = bytearray(self.nbytes)
        if os.preadv(self.file.fd, [data], self.offset) != len(data):
            raise OSError("the spill file was cut short")
        return torch.frombuffer(data, dtype=self.dtype).reshape(self.shape) if data else torch.empty(self.shape)


class SpillFile:
    """Tensors kept in an unnamed temporary file (removed when closed or the process ends)
    instead of memory, written with plain writes: the page cache holds them, not the process."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="allocator-hidden-")  # noqa: SIM115 (lives with the chain)
        self.fd = self._file.fileno()
        self.end = 0

    def put(self, t: Tensor) -> Spilled:
        data = t.detach().contiguous().cpu()
        raw = data.reshape(-1).view(torch.uint8).numpy()
        written = os.pwritev(self.fd, [raw], self.end) if raw.size else 0
        if written != raw.size:
            raise OSError(f"could not write {raw.size} bytes of hidden states to the temporary folder")
        spilled = Spilled(self, self.end, data.shape, data.dtype)
        self.end += raw.size
        return spilled


@dataclass
class Chain:
    """The blocks of a model and, per calibration batch, each block's call and hidden input
    (`input(b, k)`: block `k`'s input; `input(b, N)` the last block's output).

    The hidden states of a model whose blocks are read on use (`profilers.resident`: a model
    too large to hold) are kept in a temporary file (`spill`), not in memory: 32 windows of a
    2048-wide model are 134 MB per block boundary."""

    blocks: list[nn.Module]
    calls: list[list[BlockCall]] = field(default_factory=list)
    hidden: list[list[Tensor | Spilled | None]] = field(default_factory=list)
    spill: SpillFile | None = None

    def __post_init__(self) -> None:
        if self.spill is None and self.blocks and is_lazy(self.blocks[0]):
            self.spill = SpillFile()

    def input(self, b: int, k: int) -> Tensor:
        """Batch `b`'s input to block `k` (`k` = the number of blocks: the last one's output)."""
        h = self.hidden[b][k]
        h = h.load() if isinstance(h, Spilled) else h
        if h is None:
            raise RuntimeError(f"batch {b}'s input to block {k} was already freed")
        return h

    def input_bytes(self, k: int) -> int:
        """Bytes of the first batch's input to block `k`, in memory or spilled."""
        h = self.hidden[0][k]
        assert h is not None
        return h.nbytes

    def _keep(self, h: Tensor) -> Tensor | Spilled:
        return self.spill.put(h) if self.spill is not None else h.detach()

    @contextmanager
    def recording(self, stop: bool = False) -> Iterator[None]:
        """Record the block calls and hidden states of the forward passes run inside (one
        batch per pass). Raises `NotAChain` when a block is skipped, repeated, or fed
        something other than the previous block's output. With `stop`, a pass ends at the last
        block's output (the head, a large vocabulary's logits, is not run): run it through
        `until_stopped`."""
        n = len(self.blocks)
        state: dict[str, Any] = {}

        def pre(k: int):
            def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                if k == 0:
                    state["calls"], state["hidden"], state["last"] = [], [], None
                    self.calls.append(state["calls"])
                    self.hidden.append(state["hidden"])
                if len(state.get("calls", ())) != k:
                    raise NotAChain(f"block {k} ran out of order")
                slot, h = _hidden_input(args, kwargs)
                last = state["last"]
                if k > 0 and h is not last and not (h.shape == last.shape and torch.equal(h, last)):
                    raise NotAChain(f"block {k} is not fed the output of block {k - 1}")
                kept = tuple(None if i == slot else _stateless(a) for i, a in enumerate(args))
                kw = {key: _stateless(v) for key, v in kwargs.items() if key != slot}
                if "use_cache" in kw:
                    kw["use_cache"] = False
                state["calls"].append(BlockCall(kept, kw, slot))
                state["hidden"].append(self._keep(h))

            return hook

        def post(k: int):
            def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
                h = _hidden_of(out)
                if isinstance(out, tuple):
                    state["calls"][k].rest = tuple(out[1:])
                state["last"] = h
                if k == n - 1:
                    state["hidden"].append(self._keep(h))
                    if stop:
                        raise _Stop(h)

            return hook

        handles = []
        for k, block in enumerate(self.blocks):
            handles.append(block.register_forward_pre_hook(pre(k), with_kwargs=True))
            handles.append(block.register_forward_hook(post(k), with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        if any(len(c) != n for c in self.calls) or any(len(h) != n + 1 for h in self.hidden):
            raise NotAChain("not every block ran once per batch")

    @contextmanager
    def stubbed(self, b: int, leaf: Tensor) -> Iterator[None]:
        """Every block returns its recorded output for batch `b` without running; the last one
        returns `leaf` (the last block's output, as a tensor the head's gradient reaches)."""
        n = len(self.blocks)
        saved = [block.__dict__.get("forward") for block in self.blocks]
        try:
            for k, (block, call) in enumerate(zip(self.blocks, self.calls[b], strict=True)):
                out = (lambda: leaf) if k == n - 1 else (lambda k=k: self.input(b, k + 1))
                block.forward = lambda *a, _c=call, _o=out, **kw: _c.output(_o())  # type: ignore[method-assign]
            yield
        finally:
            for block, fwd in zip(self.blocks, saved, strict=True):
                if fwd is None:
                    del block.forward
                else:
                    block.forward = fwd  # type: ignore[method-assign]

    @staticmethod
    def until_stopped(forward: Callable[[], Any]) -> Any | None:
        """`forward()`'s output, or None when a `recording(stop=True)` ended it at the last block."""
        try:
            return forward()
        except _Stop:
            return None

    def stem_output(self, forward: Callable[[], Any]) -> Tensor:
        """Run `forward` (a forward pass of the model) only up to the first block; the hidden
        state it would have fed that block."""

        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            raise _Stop(_hidden_input(args, kwargs)[1])

        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            forward()
        except _Stop as stop:
            return stop.hidden
        finally:
            handle.remove()
        raise NotAChain("the forward pass never reached the first block")

    def free(self, k: int) -> None:
        """Drop every batch's hidden state `k` (no longer needed once block `k` ran backward)."""
        for h in self.hidden:
            h[k] = None
