"""What the packed file stores for one planned layer (`StoredLayer`), shared by the applier, the
block reconstruction and the export, so that all three hold the same numbers."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from profilers.quant.ggml.fit import GgmlTensor
from profilers.quant.quantize import Term
from profilers.quant.rounding import assemble
from profilers.types import Choice

__all__ = ["StoredLayer"]


@dataclass(frozen=True)
class StoredLayer:
    """One planned layer as stored.

    Attributes:
        choice: the plan's choice for the layer.
        shape: the weight's shape.
        terms: the whole terms (rotated choices hold `W R`); empty for an fp16 choice.
        extra: for a fractional choice, the `(T+1)`-term quantization of `rows` (its first `T`
            terms are `terms` at those rows; the last is stored).
        rows: the rows carrying the extra term.
        fp16: the fp16 weight of an unquantized choice.
        ggml: the tensor of a llama.cpp block type (`terms` is then empty).
    """

    choice: Choice
    shape: tuple[int, ...]
    terms: list[Term]
    extra: list[Term] | None = None
    rows: Tensor | None = None
    fp16: Tensor | None = None
    ggml: GgmlTensor | None = None

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.shape[0], math.prod(self.shape[1:])

    def weight(self) -> Tensor:
        """The float32 weight the stored tensors rebuild, in the layer's shape."""
        if self.fp16 is not None:
            return self.fp16.float()
        if self.ggml is not None:
            return self.ggml.dequantize().reshape(self.shape)
        return assemble(self.matrix_shape, self.choice, self.terms, self.extra, self.rows).reshape(self.shape)
