"""Base rounding methods under every term: `rtn` and `gptq`, behind one interface, and the
error stacks the estimators score.

`rtn` rounds to nearest with the error-minimising clipping search; `gptq` feeds each column's
rounding error back into the columns not yet quantized, using the layer's input second moment
`H` (`profilers.input_hessians`). Layers without an `H` (embeddings, grouped convolutions) are
rounded to nearest under either method. Profilers and the applier both go through here, so a
profile scores exactly what the applier will produce.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ..types import Choice
from .gptq import gptq_reconstructions, gptq_terms
from .options import DEFAULT_METHOD, METHODS, needs_hessian
from .quantize import Term, as_matrix, dequantize_terms, quantize_terms, residual_reconstructions

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "Method",
    "Quantizer",
    "error_stack",
    "fake_quantize",
    "layer_terms",
    "reconstruct",
]

Method = Literal["rtn", "gptq", "gptq-act"]


def layer_terms(w2d: Tensor, choice: Choice, *, method: Method = "rtn", hessian: Tensor | None = None) -> list[Term]:
    """The whole terms of `choice` for a matrix, by `method` (GPTQ only where `hessian` is given)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if needs_hessian(method) and hessian is not None:
        return gptq_terms(w2d, hessian, choice, act_order=method == "gptq-act")
    return quantize_terms(w2d, choice)


def reconstruct(
    w: Tensor,
    choice: Choice,
    *,
    method: Method = "rtn",
    hessian: Tensor | None = None,
    extra_rows: Tensor | None = None,
) -> Tensor:
    """`w` replaced by its reconstruction under `choice` and `method` (same shape and dtype);
    a fractional choice gives its extra term to exactly `extra_rows`."""
    if not choice.quantized:
        return w.detach().half().to(w.dtype)
    w2d = as_matrix(w).float()
    out = dequantize_terms(layer_terms(w2d, choice.base, method=method, hessian=hessian))
    if choice.extra:
        if extra_rows is None or len(extra_rows) != choice.extra_rows(w2d.shape[0]):
            got = None if extra_rows is None else len(extra_rows)
            raise ValueError(
                f"{choice.label} needs the {choice.extra_rows(w2d.shape[0])} rows that carry the extra term, got {got}"
            )
        rows = torch.as_tensor(extra_rows, dtype=torch.long)
        # Rows are quantized independently (GPTQ too: H acts along columns), so the extra term of
        # these rows is the last term of their (T+1)-term quantization.
        richer = layer_terms(w2d[rows], choice.next_term, method=method, hessian=hessian)
        out[rows] = dequantize_terms(richer)
    return out.reshape(w.shape).to(w.dtype)


def fake_quantize(w: Tensor, choice: Choice, *, extra_rows: Tensor | None = None) -> Tensor:
    """`w` replaced by its round-to-nearest reconstruction under `choice` (same shape and dtype).

    `fp16` rounds to half precision, which is how unquantized tensors are stored. A fractional
    choice gives its extra term to exactly `extra_rows` (row indices of the matrix view): those
    rows take the reconstruction with one more term.

    Example:
        >>> w = torch.randn(8, 64)
        >>> err = (fake_quantize(w, Choice(bits=4, group_size=32)) - w).pow(2).mean()
        >>> bool(err < 0.01)
        True
    """
    return reconstruct(w, choice, method="rtn", extra_rows=extra_rows)


@dataclass
class Quantizer:
    """A rounding method with the `H` of each layer (by target index) it needs."""

    method: Method = "rtn"
    hessians: dict[int, Tensor] = field(default_factory=dict)

    def stack(self, target: int, weight: Tensor, choices: Sequence[Choice]) -> Tensor:
        """`error_stack` of a layer's weight under this method."""
        return error_stack(weight, choices, method=self.method, hessian=self.hessians.get(target))

    def reconstruct(self, target: int, w: Tensor, choice: Choice, extra_rows: Tensor | None = None) -> Tensor:
        return reconstruct(w, choice, method=self.method, hessian=self.hessians.get(target), extra_rows=extra_rows)


def error_stack(
    weight: Tensor, stack: Sequence[Choice], *, method: str = "rtn", hessian: Tensor | None = None
) -> Tensor:
    """`[K, rows, cols]` float32 errors `reconstruct(W, c) - W` for the whole-term `stack`.

    Round to nearest: one residual run per (bits, group, symmetry) serves every term count of
    that setting. GPTQ (given the layer's `hessian`): one column sweep per term index for all
    choices together.
    """
    w = as_matrix(weight.detach()).float()
    for c in stack:
        if c.extra:
            raise ValueError(f"the error stack holds whole-term choices only, got {c.label}")
    if needs_hessian(method) and hessian is not None:
        recs = gptq_reconstructions(w, hessian, list(stack), act_order=method == "gptq-act")
        return torch.stack([r - w for r in recs])
    out = torch.empty((len(stack), *w.shape), dtype=torch.float32)
    runs: dict[tuple[int, int | None, bool], list[int]] = {}
    for k, c in enumerate(stack):
        if not c.quantized:
            out[k] = w.half().float() - w
        elif c.kind != "residual":
            torch.sub(dequantize_terms(quantize_terms(w, c)), w, out=out[k])
        else:
            runs.setdefault((c.bits, c.group_size, c.symmetric), []).append(k)
    for (bits, group, sym), ks in runs.items():
        recs = residual_reconstructions(
            w, bits=bits, terms=max(stack[k].terms for k in ks), group_size=group, symmetric=sym
        )
        for k in ks:
            torch.sub(recs[stack[k].terms - 1], w, out=out[k])
    return out
