"""Uniform quantizer primitives: pure functions of tensors, no globals, no default device.

A weight is viewed as a matrix `[rows, cols]` (`as_matrix`); groups of `group_size`
consecutive elements of a row share one scale (and, when asymmetric, one offset). The last
group of a row may be shorter when `group_size` does not divide `cols`.

Asymmetric (default): codes `q` in `[0, 2^b - 1]`, `w_hat = q * scale + offset`, with `scale`
and `offset` stored as fp16 (the fake-quantized values use the fp16-rounded numbers, so they
equal what a packed file reproduces). Symmetric: signed codes in `[-2^(b-1), 2^(b-1) - 1]`,
`w_hat = q * scale`.

Multi-term residual quantization: term `t` quantizes `R_t = W - sum_{j<t} w_hat_j`, so
`W ≈ sum_t w_hat_t` and the error falls as terms are added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .specs import Choice

__all__ = [
    "CLIP_RATIOS",
    "Term",
    "as_matrix",
    "dequantize",
    "dequantize_terms",
    "fake_quantize",
    "n_groups",
    "quantize_groups",
    "quantize_residual",
]

# Candidate shrink factors of each group's range for the error-minimising clipping search.
CLIP_RATIOS: tuple[float, ...] = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.0 ... 0.5

_FP16_MAX = 65504.0
_FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal)


@dataclass(frozen=True)
class Term:
    """One quantized term of a matrix.

    Attributes:
        codes: `[rows, cols]` integer codes (uint8 when asymmetric, int8 when symmetric).
        scale: `[rows, n_groups]` fp16 step sizes.
        offset: `[rows, n_groups]` fp16 value of code 0 (asymmetric), or None (symmetric).
        bits: bits per code.
        group_size: group length along a row (`cols` when per channel).
    """

    codes: Tensor
    scale: Tensor
    offset: Tensor | None
    bits: int
    group_size: int


def as_matrix(w: Tensor) -> Tensor:
    """View a Linear / Conv / Embedding weight as `[rows, cols]` (rows = output channels)."""
    if w.dim() < 2:
        raise ValueError(f"expected a weight with at least 2 dimensions, got shape {tuple(w.shape)}")
    return w.reshape(w.shape[0], -1)


def n_groups(cols: int, group_size: int | None) -> int:
    """Groups per row for `cols` elements (per channel when `group_size` is None)."""
    g = cols if group_size is None else min(group_size, cols)
    return math.ceil(cols / g)


def _grouped(w2d: Tensor, group_size: int) -> tuple[Tensor, Tensor | None]:
    """Reshape `[rows, cols]` to `[rows, n_groups, group_size]`, padding the last group.

    Padding repeats the row's last element so the group's min/max do not change; the returned
    mask (None when no padding) is 0 at padded positions so they do not count in errors.
    """
    rows, cols = w2d.shape
    ng = math.ceil(cols / group_size)
    pad = ng * group_size - cols
    if pad == 0:
        return w2d.reshape(rows, ng, group_size), None
    w_pad = torch.cat([w2d, w2d[:, -1:].expand(rows, pad)], dim=1)
    mask = torch.ones(ng * group_size, dtype=w2d.dtype, device=w2d.device)
    mask[cols:] = 0
    return w_pad.reshape(rows, ng, group_size), mask.reshape(1, ng, group_size)


def _to_fp16_grid(x: Tensor) -> Tensor:
    return x.clamp(-_FP16_MAX, _FP16_MAX).half().float()


def quantize_groups(
    w2d: Tensor,
    *,
    bits: int,
    group_size: int | None,
    symmetric: bool = False,
    clip_ratios: tuple[float, ...] = CLIP_RATIOS,
) -> Term:
    """Quantize a matrix group-wise, choosing per group the clip ratio with least squared error.

    Args:
        w2d: `[rows, cols]` float tensor.
        bits: bits per code, 2..8.
        group_size: elements per group along a row; None = per output channel.
        symmetric: signed codes with a scale only, instead of unsigned codes, scale and offset.
        clip_ratios: factors shrinking each group's range; `(1.0,)` is plain min/max rounding.

    Returns:
        The `Term` whose `dequantize` is the closest of the candidates to `w2d`, group by group.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8 for integer codes, got {bits}")
    if w2d.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(w2d.shape)}")
    rows, cols = w2d.shape
    g = cols if group_size is None else min(group_size, cols)
    w = w2d.detach().float()
    wg, mask = _grouped(w, g)

    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        amax = wg.abs().amax(dim=-1, keepdim=True)
        lo = hi = None
    else:
        qmin, qmax = 0, 2**bits - 1
        lo = wg.amin(dim=-1, keepdim=True)
        hi = wg.amax(dim=-1, keepdim=True)

    best_err = best_scale = best_offset = None
    work = torch.empty_like(wg)
    for r in clip_ratios:
        if symmetric:
            scale = _to_fp16_grid(amax * (r / qmax)).clamp_min(_FP16_TINY)
            offset = None
            torch.div(wg, scale, out=work)
        else:
            scale = _to_fp16_grid((hi - lo) * (r / qmax)).clamp_min(_FP16_TINY)
            offset = _to_fp16_grid(lo * r)
            torch.sub(wg, offset, out=work).div_(scale)
        work.round_().clamp_(qmin, qmax).mul_(scale)
        if offset is not None:
            work.add_(offset)
        work.sub_(wg).square_()
        if mask is not None:
            work.mul_(mask)
        err = work.sum(dim=-1, keepdim=True)
        if best_err is None:
            best_err, best_scale, best_offset = err, scale.expand_as(err).clone(), offset
            if offset is not None:
                best_offset = offset.expand_as(err).clone()
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if offset is not None:
            best_offset = torch.where(better, offset, best_offset)

    if symmetric:
        codes = torch.div(wg, best_scale).round_().clamp_(qmin, qmax)
    else:
        codes = torch.sub(wg, best_offset).div_(best_scale).round_().clamp_(qmin, qmax)
    codes = codes.reshape(rows, -1)[:, :cols].to(torch.int8 if symmetric else torch.uint8)
    return Term(
        codes=codes.contiguous(),
        scale=best_scale.squeeze(-1).half(),
        offset=None if best_offset is None else best_offset.squeeze(-1).half(),
        bits=bits,
        group_size=g,
    )


def dequantize(term: Term) -> Tensor:
    """Reconstruct the float32 `[rows, cols]` matrix a `Term` stands for."""
    _rows, cols = term.codes.shape
    expand = lambda t: t.float().repeat_interleave(term.group_size, dim=1)[:, :cols]  # noqa: E731
    out = term.codes.float() * expand(term.scale)
    if term.offset is not None:
        out += expand(term.offset)
    return out


def quantize_residual(
    w2d: Tensor,
    *,
    bits: int,
    terms: int,
    group_size: int | None,
    symmetric: bool = False,
    clip_ratios: tuple[float, ...] = CLIP_RATIOS,
) -> list[Term]:
    """Multi-term residual quantization: term t quantizes what terms 1..t-1 left over."""
    if terms < 1:
        raise ValueError(f"terms must be at least 1, got {terms}")
    residual = w2d.detach().float()
    out: list[Term] = []
    for _ in range(terms):
        term = quantize_groups(residual, bits=bits, group_size=group_size, symmetric=symmetric, clip_ratios=clip_ratios)
        out.append(term)
        residual = residual - dequantize(term)
    return out


def dequantize_terms(terms: list[Term]) -> Tensor:
    """Sum of the reconstructions of all terms."""
    total = dequantize(terms[0])
    for term in terms[1:]:
        total += dequantize(term)
    return total


def fake_quantize(w: Tensor, choice: Choice, *, clip_ratios: tuple[float, ...] = CLIP_RATIOS) -> Tensor:
    """Return `w` replaced by its reconstruction under `choice` (same shape and dtype).

    `fp16` rounds to half precision, which is how unquantized tensors are stored.

    Example:
        >>> w = torch.randn(8, 64)
        >>> err = (fake_quantize(w, Choice(bits=4, group_size=32)) - w).pow(2).mean()
        >>> bool(err < 0.01)
        True
    """
    if not choice.quantized:
        return w.detach().half().to(w.dtype)
    terms = quantize_residual(
        as_matrix(w),
        bits=choice.bits,
        terms=choice.terms,
        group_size=choice.group_size,
        symmetric=choice.symmetric,
        clip_ratios=clip_ratios,
    )
    return dequantize_terms(terms).reshape(w.shape).to(w.dtype)
