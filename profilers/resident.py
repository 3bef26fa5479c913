"""Blocks whose weights stay in the model file until a stage uses them.

A model loaded block-lazily (`allocator.sources.lazy`) has every parameter of its repeated
blocks backed by an untouched placeholder (`torch.empty`: address space, no resident memory)
until the block runs or a stage holds it; then the block's tensors are read from the file into
the same `nn.Parameter` objects (so `QuantTarget.weight` and every other reference stays
valid), and dropped again when room is needed for another block.

- Running a block (its forward) reads it first (a forward pre-hook), so forward passes of the
  whole model need nothing from their caller.
- A stage that reads weights outside a forward pass, or runs backward through a block, holds
  it: `with held(module): ...` (any module inside the block; a no-op for ordinary modules).
- A block read in a forward pass with gradients enabled is kept until a hold on it ends (autograd
  may still read its weights), so a backward pass never sees a dropped weight.
- At most `capacity` blocks are resident at once beyond those held or kept; the least recently
  used one is dropped first.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .heap import release_freed_memory

__all__ = ["LazyBlocks", "block_reader", "held", "is_lazy", "resident_bytes", "state_with_owners"]

# Every module inside a lazy block -> (its LazyBlocks, the block's index).
_OWNER: weakref.WeakKeyDictionary[nn.Module, tuple[LazyBlocks, int]] = weakref.WeakKeyDictionary()


class LazyBlocks:
    """The blocks of a model, read from a file on use (see the module docstring).

    Args:
        blocks: the repeated blocks, their parameters placeholders of the right shapes and dtypes.
        read: block index -> its tensors by parameter name inside the block (every parameter).
        capacity: blocks kept resident beyond those held (at least 1).
    """

    def __init__(
        self, blocks: Sequence[nn.Module], read: Callable[[int], dict[str, Tensor]], capacity: int = 2
    ) -> None:
        self.blocks = list(blocks)
        self.read = read
        self.capacity = max(1, capacity)
        self.loads = 0  # blocks read from the file so far
        self._resident: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self._holds = [0] * len(self.blocks)
        self._kept: set[int] = set()  # read with gradients on: kept until a hold ends
        for k, block in enumerate(self.blocks):
            for module in block.modules():
                _OWNER[module] = (self, k)
            block.register_forward_pre_hook(self._before(k))
            block.register_forward_hook(self._after(k))

    # -- what stages call -----------------------------------------------------------------------

    @contextmanager
    def holding(self, k: int) -> Iterator[None]:
        """Block `k` resident for the duration."""
        self._holds[k] += 1
        try:
            self._ensure(k)
            yield
        finally:
            self._holds[k] -= 1
            if not self._holds[k]:
                self._kept.discard(k)
                self._trim()

    def resident(self) -> list[int]:
        """Blocks whose weights are in memory now."""
        return list(self._resident)

    # -- hooks ---------------------------------------------------------------------------------

    def _before(self, k: int) -> Callable[..., None]:
        def hook(block: nn.Module, args: Any) -> None:
            if block is not self.blocks[k]:  # copy.deepcopy copies the hooks, not what they read into
                raise RuntimeError(
                    "a copy of a model read block by block cannot read its weights; load the model whole to copy it"
                )
            if "forward" in block.__dict__:  # a stand-in forward (`Chain.stubbed`) reads no weight
                return
            self._ensure(k)
            if torch.is_grad_enabled():
                self._kept.add(k)

        return hook

    def _after(self, k: int) -> Callable[..., None]:
        def hook(block: nn.Module, args: Any, out: Any) -> None:
            self._trim()

        return hook

    # -- residency ------------------------------------------------------------------------------

    def _ensure(self, k: int) -> None:
        if k in self._resident:
            self._resident.move_to_end(k)
            return
        tensors = self.read(k)
        params = dict(self.blocks[k].named_parameters())
        missing = sorted(set(params) - set(tensors))
        if missing:
            raise KeyError(f"block {k}'s tensors lack {', '.join(missing[:3])}")
        with torch.no_grad():
            for name, p in params.items():
                t = tensors[name]
                if t.shape != p.shape:
                    raise ValueError(f"block {k}'s {name} is {tuple(t.shape)} in the file, {tuple(p.shape)} here")
                p.data = t.to(p.dtype).contiguous()
        self.loads += 1
        self._resident[k] = None
        self._trim(keep=k)

    def _trim(self, keep: int | None = None) -> None:
        """Drop least recently used blocks, neither held nor kept, down to `capacity`."""
        droppable = [k for k in self._resident if k != keep and not self._holds[k] and k not in self._kept]
        excess = len(self._resident) - self.capacity
        for k in droppable[: max(0, excess)]:
            self._drop(k)

    def _drop(self, k: int) -> None:
        with torch.no_grad():
            for p in self.blocks[k].parameters():
                p.data = torch.empty(p.shape, dtype=p.dtype)
        del self._resident[k]
        release_freed_memory()  # a 1B model's blocks read per batch left 0.6 GB in glibc's heap


def block_reader(module: nn.Module) -> tuple[Callable[[int], dict[str, Tensor]], int] | None:
    """How the lazy block holding `module` is read (`read(k)`, the reader `LazyBlocks` was given)
    and its index `k`; None for an ordinary module."""
    owner = _OWNER.get(module)
    return None if owner is None else (owner[0].read, owner[1])


def is_lazy(module: nn.Module) -> bool:
    """Whether `module` lies inside a block read on use."""
    return module in _OWNER


@contextmanager
def held(*modules: nn.Module) -> Iterator[None]:
    """The blocks holding `modules` resident for the duration (nothing for ordinary modules)."""
    owners = {(id(lazy), k): (lazy, k) for m in modules if (found := _OWNER.get(m)) is not None for lazy, k in [found]}
    if not owners:
        yield
        return
    with _holding(list(owners.values())):
        yield


@contextmanager
def _holding(owners: list[tuple[LazyBlocks, int]]) -> Iterator[None]:
    if not owners:
        yield
        return
    (lazy, k), rest = owners[0], owners[1:]
    with lazy.holding(k), _holding(rest):
        yield


def resident_bytes(model: nn.Module) -> int:
    """Bytes of `model`'s parameters and buffers in memory at most: all of an ordinary model; of
    a model read block by block, its stem and head and `capacity` + 1 of its blocks (one held)."""
    tensors: dict[int, int] = {}
    lazies: dict[int, LazyBlocks] = {}
    for module in model.modules():
        owner = _OWNER.get(module)
        if owner is not None:
            lazies[id(owner[0])] = owner[0]
            continue
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            tensors[t.data_ptr()] = t.numel() * t.element_size()
    blocks = 0
    for lazy in lazies.values():
        per_block = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in lazy.blocks)
        blocks += (lazy.capacity + 1) * per_block
    return sum(tensors.values()) + blocks


def state_with_owners(model: nn.Module) -> list[tuple[str, Tensor, nn.Module]]:
    """`model.state_dict(keep_vars=True)` as (key, tensor, the module holding it): what reads
    or writes the state of a model read block by block needs, to hold (`held`) or skip its block."""
    modules = dict(model.named_modules(remove_duplicate=False))
    return [(key, t, modules[key.rpartition(".")[0]]) for key, t in model.state_dict(keep_vars=True).items()]
