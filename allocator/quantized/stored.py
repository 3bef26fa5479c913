"""What the packed file stores for one planned layer (`StoredLayer`, made by `stored_layer`), shared
by the applier, the block reconstruction and the export, so that all three hold the same numbers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from profilers.quant.ggml.fit import GgmlTensor
from profilers.quant.quantize import Term, as_matrix
from profilers.quant.rounding import assemble, ggml_tensor, stored_terms
from profilers.types import Choice

__all__ = ["StoredLayer", "stored_layer"]


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


def stored_layer(weight: Tensor, choice: Choice, rows: np.ndarray | None, method: str, h: Tensor | None) -> StoredLayer:
    """What a layer stores under `choice` (`rows`: those carrying a fractional choice's extra term),
    rounded by `method` with `H` `h` where it needs one."""
    shape = tuple(weight.shape)
    if not choice.quantized:
        return StoredLayer(choice, shape, [], fp16=weight.detach().half())
    w2d = as_matrix(weight.detach()).float()
    if choice.ggml is not None:
        return StoredLayer(choice, shape, [], ggml=ggml_tensor(w2d, choice, method=method, hessian=h))  # type: ignore[arg-type]
    extra = torch.as_tensor(rows, dtype=torch.long) if choice.extra and rows is not None else None
    terms, extra_term = stored_terms(w2d, choice, method=method, hessian=h, extra_rows=extra)  # type: ignore[arg-type]
    return StoredLayer(choice, shape, terms, extra_term, extra)
