"""Stored terms made trainable: what block reconstruction (`refine`) and end-to-end tuning (`tune`)
move, kept exactly what the packed file stores.

Per term: a rounding shift `V` in `[-0.5, 0.5]` on every code (a code moves at most one step;
straight-through rounding), and for residual terms a relative change of each group's scale (at
most ±50%) and a shift of its offset in units of that scale. Tied terms share term 0's scale,
so only their codes move.
"""

from __future__ import annotations

import torch
from torch import Tensor

from profilers.quant.quantize import Term
from profilers.quant.rotation import rotation_signs, unrotate

from .stored import StoredLayer

__all__ = ["TunedLayer", "TunedTerm"]

_MAX_SCALE_CHANGE = 0.5


class TunedTerm:
    """One stored term with trainable rounding shifts (and, for residual terms, scale and offset)."""

    def __init__(self, term: Term, scales: bool, codes: bool = True) -> None:
        self.term = term
        self.codes = term.codes.float()
        signed = term.codes.dtype == torch.int8  # symmetric terms; a tied term's later digits are unsigned
        self.low = -(1 << (term.bits - 1)) if signed else 0
        self.high = (1 << (term.bits - 1)) - 1 if signed else (1 << term.bits) - 1
        self.scale = term.scale.float()
        self.offset = None if term.offset is None else term.offset.float()
        self.shift = torch.zeros_like(self.codes, requires_grad=True) if codes else None
        self.rel = torch.zeros_like(self.scale, requires_grad=True) if scales else None
        self.move = torch.zeros_like(self.scale, requires_grad=True) if scales and self.offset is not None else None

    def params(self) -> list[Tensor]:
        return [p for p in (self.shift, self.rel, self.move) if p is not None]

    def clamp_(self) -> None:
        if self.shift is not None:
            self.shift.clamp_(-0.5, 0.5)
        if self.rel is not None:
            self.rel.clamp_(-_MAX_SCALE_CHANGE, _MAX_SCALE_CHANGE)

    def _grid(self) -> tuple[Tensor, Tensor | None]:
        scale = self.scale if self.rel is None else self.scale * (1 + self.rel)
        offset = self.offset
        if offset is not None and self.move is not None:
            offset = offset + self.move * self.scale
        return scale, offset

    def _spread(self, t: Tensor) -> Tensor:
        return t.repeat_interleave(self.term.group_size, dim=1)[:, : self.codes.shape[1]]

    def value(self) -> Tensor:
        """The term's matrix, differentiable in every parameter (straight-through rounding)."""
        if self.shift is None:
            codes = self.codes
        else:
            moved = self.codes + self.shift
            codes = (moved + (moved.round() - moved).detach()).clamp(self.low, self.high)
        scale, offset = self._grid()
        out = codes * self._spread(scale)
        return out if offset is None else out + self._spread(offset)

    def frozen(self) -> Term:
        """The tuned term as stored: integer codes, fp16 scale and offset."""
        with torch.no_grad():
            codes = self.term.codes if self.shift is None else \
                (self.codes + self.shift).round().clamp(self.low, self.high).to(self.term.codes.dtype)
            scale, offset = self._grid()
            half = lambda t: t.clamp(-65504.0, 65504.0).half()  # noqa: E731
            return Term(codes, half(scale), None if offset is None else half(offset), self.term.bits,
                        self.term.group_size)  # fmt: skip


class TunedLayer:
    """A layer's stored terms made trainable (with `codes=False`, their scales and offsets only);
    `value()` is its weight."""

    def __init__(self, stored: StoredLayer, *, codes: bool = True) -> None:
        self.stored = stored
        scales = stored.choice.kind == "residual"  # tied terms share term 0's scale
        self.terms = [TunedTerm(t, scales, codes) for t in stored.terms]
        self.extra = TunedTerm(stored.extra[-1], scales, codes) if stored.extra is not None else None
        self.signs = rotation_signs(stored.matrix_shape[1]) if stored.choice.rotated else None

    def tuned(self) -> list[TunedTerm]:
        return self.terms + ([self.extra] if self.extra is not None else [])

    def value(self) -> Tensor:
        out = self.terms[0].value()
        for t in self.terms[1:]:
            out = out + t.value()
        if self.extra is not None:
            out = out.index_add(0, self.stored.rows, self.extra.value())
        if self.signs is not None:
            out = unrotate(out, self.signs)
        return out.reshape(self.stored.shape)

    def frozen(self) -> StoredLayer:
        terms = [t.frozen() for t in self.terms]
        extra = None
        if self.extra is not None:
            rows = self.stored.rows
            extra = [_rows_of(t, rows) for t in terms] + [self.extra.frozen()]
        return StoredLayer(self.stored.choice, self.stored.shape, terms, extra, self.stored.rows)


def _rows_of(term: Term, rows: Tensor) -> Term:
    offset = None if term.offset is None else term.offset[rows]
    return Term(term.codes[rows], term.scale[rows], offset, term.bits, term.group_size)
