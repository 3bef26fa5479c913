"""A block of the model as a worker process gets it (`profile --ray`, `apply --ray`): the module
itself for a model held in memory, else the model file's reader (`allocator.sources.lazy.BlockFile`)
and the block's index there, so that the worker reads the weights itself; and the quantizable
layers inside it, by target index."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .heap import release_freed_memory
from .layers import QuantTarget
from .resident import block_reader
from .types import LayerSpec

__all__ = ["ShippedBlock"]


@dataclass
class ShippedBlock:
    """A block for a worker (see the module docstring).

    Attributes:
        k: the block's index in the model file's reader (-1 when the module travels).
        module: the block itself, weights included, or None: read with `reader`.
        reader: `BlockFile` of the model file (`reader.block(k)`, `reader.release(block)`).
        layers: per target index, its module's name inside the block and its spec.
    """

    k: int
    module: nn.Module | None
    reader: Any
    layers: dict[int, tuple[str, LayerSpec]]

    @classmethod
    def of(cls, block: nn.Module, targets: Mapping[int, QuantTarget]) -> ShippedBlock:
        """`block` with the `targets` inside it, each used by one module of the block."""
        inner = {id(m): n for n, m in block.named_modules()}
        shared = [t.spec.name for t in targets.values() if len(t.modules) != 1]
        if shared:
            raise ValueError(f"layer {shared[0]} is used by several modules; its block cannot be shipped")
        layers = {i: (inner[id(t.modules[0])], t.spec) for i, t in targets.items()}
        found = block_reader(block)
        if found is None:
            return cls(-1, block, None, layers)
        return cls(found[1], None, found[0], layers)

    @contextmanager
    def opened(self, threads: int) -> Iterator[tuple[nn.Module, dict[int, QuantTarget]]]:
        """In the worker: the block with its weights, and its layers as targets; torch on
        `threads` threads (the driver's: the same rounding as one process). A block read from
        the file is emptied again on exit."""
        torch.set_num_threads(threads)
        block = self.module if self.module is not None else self.reader.block(self.k)
        try:
            modules = {i: block.get_submodule(name) for i, (name, _) in self.layers.items()}
            yield block, {i: QuantTarget(spec, modules[i].weight, [modules[i]]) for i, (_, spec) in self.layers.items()}
        finally:
            if self.module is None:
                self.reader.release(block)
            release_freed_memory()

    @property
    def nbytes(self) -> int:
        """Bytes of the weights travelling with it (none when the worker reads them)."""
        return 0 if self.module is None else sum(p.numel() * p.element_size() for p in self.module.parameters())
