"""Base rounding methods under every term: `rtn` and `gptq`, behind one interface, and the
error stacks the estimators score.

`rtn` rounds to nearest with the error-minimising clipping search; `gptq` feeds each column's
rounding error back into the columns not yet quantized, using the layer's input second moment
`H` (`profilers.input_hessians`). Layers without an `H` (embeddings, grouped convolutions) are
rounded to nearest under either method. Profilers and the applier both go through here, so a
profile scores exactly what the applier will produce.

Choices of llama.cpp block types (`Choice.ggml`) are stored as a `GgmlTensor`
(`ggml_tensor`), not as terms; the same methods round them onto each type's grid
(`profilers.quant.ggml.quantize`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from ..types import Choice
from .ggml.fit import GgmlTensor
from .ggml.quantize import quantize_ggml
from .ggml.types import GGML_TYPES
from .gptq import gptq_reconstructions, gptq_terms, memoized
from .options import DEFAULT_METHOD, METHODS, needs_hessian
from .quantize import Term, as_matrix, dequantize_terms, quantize_terms, residual_reconstructions
from .rotation import rotate, rotate_hessian, rotation_signs, unrotate

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "Method",
    "Quantizer",
    "assemble",
    "error_stack",
    "fake_quantize",
    "ggml_tensor",
    "layer_terms",
    "reconstruct",
    "stored_terms",
]

Method = Literal["rtn", "gptq", "gptq-act"]


def layer_terms(w2d: Tensor, choice: Choice, *, method: Method = "rtn", hessian: Tensor | None = None) -> list[Term]:
    """The whole terms of `choice` for a matrix, by `method` (GPTQ only where `hessian` is given).
    A rotated choice's terms hold `W R` (`profilers.quant.rotation`)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if choice.ggml is not None:
        raise ValueError(f"{choice.label} is a llama.cpp block type, stored as one tensor: use ggml_tensor")
    if choice.rotated:
        w2d, hessian = _rotated(w2d, hessian)
        choice = choice.model_copy(update={"rotated": False})
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
    if choice.ggml is not None:
        return ggml_tensor(w2d, choice, method=method, hessian=hessian).dequantize().reshape(w.shape).to(w.dtype)
    terms, extra = stored_terms(w2d, choice, method=method, hessian=hessian, extra_rows=extra_rows)
    return assemble(w2d.shape, choice, terms, extra, extra_rows).reshape(w.shape).to(w.dtype)


def stored_terms(
    w2d: Tensor,
    choice: Choice,
    *,
    method: Method = "rtn",
    hessian: Tensor | None = None,
    extra_rows: Tensor | None = None,
) -> tuple[list[Term], list[Term] | None]:
    """What a quantized choice stores for a matrix: its whole terms, and for a fractional
    choice the `(T+1)`-term quantization of `extra_rows` (whose last term is stored)."""
    terms = layer_terms(w2d, choice.base, method=method, hessian=hessian)
    if not choice.extra:
        return terms, None
    if extra_rows is None or len(extra_rows) != choice.extra_rows(w2d.shape[0]):
        got = None if extra_rows is None else len(extra_rows)
        raise ValueError(
            f"{choice.label} needs the {choice.extra_rows(w2d.shape[0])} rows that carry the extra term, got {got}"
        )
    rows = torch.as_tensor(extra_rows, dtype=torch.long)
    # Rows are quantized independently (GPTQ too: H acts along columns), so the extra term of
    # these rows is the last term of their (T+1)-term quantization.
    return terms, layer_terms(w2d[rows], choice.next_term, method=method, hessian=hessian)


def ggml_tensor(w2d: Tensor, choice: Choice, *, method: Method = "rtn", hessian: Tensor | None = None) -> GgmlTensor:
    """A matrix stored in the llama.cpp block type of `choice` (GPTQ only where `hessian` is given)."""
    if choice.ggml is None:
        raise ValueError(f"{choice.label} is not a llama.cpp block type")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return quantize_ggml(w2d, [GGML_TYPES[choice.ggml]], method=method, hessian=hessian)[0]


def assemble(
    shape: torch.Size | tuple[int, int],
    choice: Choice,
    terms: list[Term],
    extra: list[Term] | None = None,
    extra_rows: Tensor | None = None,
) -> Tensor:
    """The `[rows, cols]` float32 matrix `stored_terms` describe, in the original basis."""
    out = dequantize_terms(terms)
    if extra is not None:
        out[torch.as_tensor(extra_rows, dtype=torch.long)] = dequantize_terms(extra)
    if choice.rotated:
        out = unrotate(out, rotation_signs(shape[1]))
    return out


def _rotated(
    w2d: Tensor, hessian: Tensor | None, memo: dict[Any, Any] | None = None
) -> tuple[Tensor, Tensor | None]:
    """`W R` and `Rᵀ H R` for the rotation of `w2d`'s width (`Rᵀ H R` kept in `memo` for the
    next call with the same `H`, as `gptq._prepared`)."""
    signs = rotation_signs(w2d.shape[1])
    if hessian is None:
        return rotate(w2d, signs), None
    return rotate(w2d, signs), memoized(memo, "rotated", hessian, lambda: rotate_hessian(hessian, signs))


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

    def stack(
        self, target: int, weight: Tensor, choices: Sequence[Choice], memo: dict[Any, Any] | None = None
    ) -> Tensor:
        """`error_stack` of a layer's weight (or some of its rows) under this method."""
        return error_stack(weight, choices, method=self.method, hessian=self.hessians.get(target), memo=memo)

    def reconstruct(self, target: int, w: Tensor, choice: Choice, extra_rows: Tensor | None = None) -> Tensor:
        return reconstruct(w, choice, method=self.method, hessian=self.hessians.get(target), extra_rows=extra_rows)


def error_stack(
    weight: Tensor,
    stack: Sequence[Choice],
    *,
    method: str = "rtn",
    hessian: Tensor | None = None,
    memo: dict[Any, Any] | None = None,
) -> Tensor:
    """`[K, rows, cols]` float32 errors `reconstruct(W, c) - W` for the whole-term `stack`.

    Round to nearest: one residual run per (bits, group, symmetry) serves every term count of
    that setting. GPTQ (given the layer's `hessian`): one column sweep per term index for all
    choices together. Rotated choices are rounded together in the rotated basis and their errors
    brought back (`ΔW = ΔW' Rᵀ`). `memo`, a dict kept across calls for rows of one layer, holds
    what is derived from `hessian` alone (its rotation and factorisation) for the next call.
    """
    w = as_matrix(weight.detach()).float()
    for c in stack:
        if c.extra:
            raise ValueError(f"the error stack holds whole-term choices only, got {c.label}")
    out = torch.empty((len(stack), *w.shape), dtype=torch.float32)
    blocks = [k for k, c in enumerate(stack) if c.ggml is not None]
    if blocks:  # every block type of the layer in one sweep
        types = [GGML_TYPES[stack[k].ggml] for k in blocks]  # type: ignore[index]
        for k, tensor in zip(blocks, quantize_ggml(w, types, method=method, hessian=hessian), strict=True):
            out[k] = tensor.dequantize()
    plain = [k for k, c in enumerate(stack) if not c.rotated and c.ggml is None]
    turned = [k for k, c in enumerate(stack) if c.rotated]
    if plain:
        _reconstructions(w, [stack[k] for k in plain], method, hessian, out, plain, memo)
    if turned:
        wr, hr = _rotated(w, hessian, memo)
        unturned = [stack[k].model_copy(update={"rotated": False}) for k in turned]
        _reconstructions(wr, unturned, method, hr, out, turned, memo)
        signs = rotation_signs(w.shape[1])
        for k in turned:
            out[k] = unrotate(out[k], signs)
    return out.sub_(w)


def _reconstructions(
    w: Tensor,
    stack: Sequence[Choice],
    method: str,
    hessian: Tensor | None,
    out: Tensor,
    slots: Sequence[int],
    memo: dict[Any, Any] | None = None,
) -> None:
    """`out[slots[k]]` = the reconstruction of `w` under `stack[k]` (unrotated choices)."""
    if needs_hessian(method) and hessian is not None:
        found = gptq_reconstructions(w, hessian, list(stack), act_order=method == "gptq-act", memo=memo)
        for k, r in zip(slots, found, strict=True):
            out[k] = r
        return
    runs: dict[tuple[int, int | None, bool], list[int]] = {}
    for k, c in enumerate(stack):
        if not c.quantized:
            out[slots[k]] = w.half().float()
        elif c.kind != "residual":
            out[slots[k]] = dequantize_terms(quantize_terms(w, c))
        else:
            runs.setdefault((c.bits, c.group_size, c.symmetric), []).append(k)
    for (bits, group, sym), ks in runs.items():
        recs = residual_reconstructions(
            w, bits=bits, terms=max(stack[k].terms for k in ks), group_size=group, symmetric=sym
        )
        for k in ks:
            out[slots[k]] = recs[stack[k].terms - 1]
