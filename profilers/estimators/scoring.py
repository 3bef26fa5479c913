"""Scoring the layers of one segment (`segments`): GPTQ's `H` from the inputs the segment holds,
each layer's error stack built in row chunks, and every option's first-order terms `a[s, c]`
added to the layer's running sums (`fisher_sums.LayerSums`; the score itself: `fisher`).

`SegmentScorer` names everything scoring reads besides the segment, so that a worker process
(`distributed`) scores a block from the same fields, with the same code and the same results.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..input_hessians import call_hessian
from ..layers import QuantTarget
from ..quant.options import OptionLayout, needs_hessian
from ..quant.quantize import as_matrix
from ..quant.rounding import error_stack
from .fisher_sums import LayerSums
from .replay import Segment
from .weight_grads import RowErrors, dense_products, embedding_products, output_rows

__all__ = ["SegmentScorer", "Terms"]


@dataclass
class SegmentScorer:
    """What scoring a segment's layers reads besides the segment.

    Attributes:
        targets: the weights by target index (a worker holds those of its block only).
        layouts: each target's options laid out on its error stack.
        method: the rounding (`rtn`, `gptq`).
        batches: the scored calibration batches (`H` leaves out their padding).
        first_sample: the index of each batch's first sample.
        segments_of: per target, the segments it is called in (a tied weight: several).
        shared_hessians: `H` of the weights called in several segments, from the whole pass.
        extra_hessians: `H` from the batches only `H` reads, of the layers outside the blocks.
        pool_rows: options scored by their rows' own squared terms (`fisher`).
    """

    targets: Mapping[int, QuantTarget]
    layouts: Mapping[int, OptionLayout]
    method: str
    batches: Sequence[Any]
    first_sample: Sequence[int]
    segments_of: Mapping[int, int]
    shared_hessians: Mapping[int, Tensor]
    extra_hessians: Mapping[int, Tensor]
    pool_rows: bool

    def score(self, i: int, segment: Segment, step: int | None, state: LayerSums, sums: Terms) -> None:
        """Add target `i`'s first-order terms from `segment` to its state: its error stack is
        built `step` rows at a time (all at once when None); a weight called in several
        segments has its terms summed until the last one."""
        t = self.targets[i]
        if self.segments_of[i] == 1 and all(isinstance(m, nn.Embedding) for m in t.modules):
            errors = RowErrors(t.weight, self.layouts[i].stack)  # lookups only: rows on demand
            for b, _, a, per_row, rows in self._terms(i, segment, errors, slice(None)):
                state.add(a, per_row, rows, self.first_sample[b])
            return
        hessian = self._hessian(i, segment)
        n_rows = t.spec.rows
        step = step or n_rows
        memo: dict = {}  # what the chunks of rows share: H rotated and factorised once
        for r0 in range(0, n_rows, step):
            rows = slice(r0, min(r0 + step, n_rows))
            weight = as_matrix(t.weight.detach())[rows]
            stack = error_stack(weight, self.layouts[i].stack, method=self.method, hessian=hessian, memo=memo)
            for b, d, a, per_row, _ in self._terms(i, segment, stack, rows):
                sums.add(b, d, r0, a, per_row)
            del stack
        if sums.segment_done():
            every = torch.arange(n_rows)
            for b, a, per_row in sums.terms():
                state.add(a, per_row, every, self.first_sample[b])

    def _hessian(self, i: int, segment: Segment) -> Tensor | None:
        """GPTQ's `H` of target `i` (float32): from its calls in `segment`, or from the whole
        forward pass for a weight called in several segments; plus that of the batches only `H`
        reads."""
        if not needs_hessian(self.method):
            return None
        extra = segment.extra.get(i, self.extra_hessians.get(i))
        if self.segments_of[i] > 1:
            return _float(_sum(self.shared_hessians.get(i), extra))
        mine = [(b, s.call) for b, seen in enumerate(segment.seen) for s in seen if s.call.target == i]
        key = tuple((b, call.inp.data_ptr(), call.inp.shape) for b, call in mine)  # q, k, v share their inputs
        if key not in segment.hessians:
            hessian = None
            for b, call in mine:
                h = call_hessian(call, self.batches[b])
                if h is not None:
                    hessian = h if hessian is None else hessian.add_(h)
            segment.hessians = {key: hessian}
        return _float(_sum(segment.hessians[key], extra))

    def _terms(
        self, i: int, segment: Segment, stack: Tensor | RowErrors, rows: slice
    ) -> Iterator[tuple[int, int, Tensor, Tensor | None, Tensor]]:
        """Per batch and draw, target `i`'s first-order terms `a [n, K]` (and per row, for
        fractions) over weight rows `rows`, summed over its calls in `segment`, with the rows
        they cover."""
        n_paired = len(self.layouts[i].stack) if self.pool_rows else self.layouts[i].n_paired
        for b, seen in enumerate(segment.seen):
            mine = [s for s in seen if s.call.target == i]
            if not mine:
                continue
            if isinstance(stack, RowErrors):
                covered = torch.unique(torch.cat([s.call.inp.reshape(-1) for s in mine]))
                errors = stack.get(covered)
            else:
                covered, errors = torch.arange(self.targets[i].spec.rows)[rows], stack
            for d in range(len(mine[0].grads)):
                a = per_row = None
                for s in mine:
                    g = s.grads[d]
                    if isinstance(s.call.module, nn.Embedding):
                        a1, p1 = embedding_products(s.call, g, covered, errors, n_paired)
                    else:
                        a1, p1 = dense_products(s.call, output_rows(s.call, g, rows), errors, n_paired)
                    a = a1 if a is None else a + a1
                    per_row = p1 if per_row is None or p1 is None else per_row + p1
                yield b, d, a, per_row, covered


def _sum(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


def _float(h: Tensor | None) -> Tensor | None:
    return None if h is None else h.float()


class Terms:
    """A weight's first-order terms per (batch, draw), summed over the segments it is called in
    (a tied embedding and LM head) and joined over the row chunks its stack was built in."""

    def __init__(self, segments: int) -> None:
        self.left = segments
        self.sums: dict[tuple[int, int, int], tuple[Tensor, Tensor | None]] = {}

    def add(self, b: int, draw: int, r0: int, a: Tensor, per_row: Tensor | None) -> None:
        key = (b, draw, r0)
        if key in self.sums:
            a0, p0 = self.sums[key]
            a, per_row = a0 + a, None if per_row is None or p0 is None else p0 + per_row
        self.sums[key] = (a, per_row)

    def segment_done(self) -> bool:
        self.left -= 1
        return not self.left

    def terms(self) -> Iterator[tuple[int, Tensor, Tensor | None]]:
        """Per (batch, draw) in order: the batch, `a` summed over chunks, per-row terms joined."""
        keys = sorted({(b, d) for b, d, _ in self.sums})
        for b, d in keys:
            parts = [self.sums[key] for key in sorted(k for k in self.sums if k[:2] == (b, d))]
            a = torch.stack([p[0] for p in parts]).sum(dim=0) if len(parts) > 1 else parts[0][0]
            rows = [p[1] for p in parts]
            per_row = None if any(r is None for r in rows) else torch.cat(rows, dim=-1)  # type: ignore[arg-type]
            yield b, a, per_row
        self.sums.clear()
