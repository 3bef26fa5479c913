"""How much memory a streamed Fisher profile needs, and the row chunks that keep it in a bound.

The estimate, model included:

    model weights + runtime + what is carried between segments (recorded hidden states, one
    gradient per draw) + the head's transient tensors + a chunk of per-sample gradients
    + the largest segment's held inputs and output-gradients
    + one layer's error stack being built: 3 x stack rows x chunk rows x cols x 4 bytes
      (the stack, GPTQ's transposed weights and its codes)

Only the last term shrinks with a bound: a layer's rows round independently, so its stack is
built and scored `chunk` rows at a time. The rest is fixed by the model and the calibration
data; a bound below it is refused, naming the smallest one that works.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..heap import release_freed_memory
from ..quant.options import needs_hessian
from ..resident import resident_bytes
from .base import ProfileRun
from .segments import SegmentPasses

__all__ = ["MemoryBudget", "default_max_memory", "format_size", "memory_budget", "release_freed_memory"]

RUNTIME_BYTES = 512 * 2**20  # the interpreter, torch and its libraries, resident
GRAD_CHUNK_BYTES = 4 * (1 << 25)  # per-sample weight gradients are built in chunks this big (fisher)
STACK_COPIES = 3  # the stack, GPTQ's transposed weights, its codes
# GPTQ's H per entry: H and its rotation kept for the layer's row chunks (float32), their factorisations
# (float32), and two float64 matrices while one is made (`gptq.prepare_hessian`).
HESSIAN_BYTES_PER_ENTRY = 4 + 4 + 8 + 2 * 8
MIN_CHUNK_ROWS = 16


def default_max_memory() -> int:
    """The bound when none is given: 80% of this machine's physical memory."""
    try:
        return int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not POSIX
        return 16 * 2**30




def format_size(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{int(n)}B"


@dataclass
class _Layer:
    segment: str
    rows: int
    row_bytes: int  # one row of its stack, all copies
    hessian_bytes: int = 0  # GPTQ's work on its H, whatever the rows


@dataclass
class MemoryBudget:
    """The fixed part of each segment's memory and, per target, what one stack row adds."""

    fixed: dict[str, int]  # per segment name
    layers: dict[int, _Layer]

    def need(self, i: int, rows: int) -> int:
        layer = self.layers[i]
        return self.fixed[layer.segment] + layer.hessian_bytes + layer.row_bytes * rows

    def smallest(self) -> tuple[int, str]:
        """The smallest bound every layer fits in with its smallest chunk, and the segment that sets it."""
        if not self.layers:
            worst = max(self.fixed.items(), key=lambda kv: kv[1])
            return worst[1], worst[0]
        needs = {i: self.need(i, min(layer.rows, MIN_CHUNK_ROWS)) for i, layer in self.layers.items()}
        i = max(needs, key=needs.__getitem__)
        return needs[i], self.layers[i].segment

    def chunks(self, bound: int) -> dict[int, int]:
        """Rows per stack chunk of each target within `bound` (whole layers where they fit)."""
        out = {}
        for i, layer in self.layers.items():
            room = bound - self.fixed[layer.segment]
            out[i] = max(min(layer.rows, MIN_CHUNK_ROWS), min(layer.rows, room // max(1, layer.row_bytes)))
        return out


def memory_budget(run: ProfileRun, passes: SegmentPasses) -> MemoryBudget:
    """The memory of `run` as `passes` will stream it (`FisherProfiler`)."""
    base = (
        resident_bytes(run.model)  # a model read block by block: a few of its blocks
        + RUNTIME_BYTES
        + passes.carried_bytes
        + GRAD_CHUNK_BYTES
    )
    # The head's output and its copies exist in the head segment only (a 128k vocabulary: 1 GB).
    fixed = {name: base + n + (passes.transient_bytes if name in ("head", "model") else 0)
             for name, n in passes.segment_bytes.items()}  # fmt: skip
    layers = {}
    for i, names in passes.where.items():
        spec = run.targets[i].spec
        name = max(names, key=lambda s: fixed.get(s, base))
        fixed.setdefault(name, base)
        gptq = HESSIAN_BYTES_PER_ENTRY * spec.cols**2 if needs_hessian(run.quantizer.method) else 0
        layers[i] = _Layer(name, spec.rows, STACK_COPIES * len(run.layouts[i].stack) * spec.cols * 4, gptq)
    return MemoryBudget(fixed, layers)
