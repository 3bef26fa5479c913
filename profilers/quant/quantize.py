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

from ..types import Choice
from .cost import n_groups

__all__ = [
    "Term",
    "as_matrix",
    "clip_ratios",
    "dequantize",
    "dequantize_terms",
    "n_groups",
    "quantize_groups",
    "quantize_joint",
    "quantize_residual",
    "quantize_terms",
    "quantize_tied",
    "residual_reconstructions",
    "split_digits",
]


def _ratios(low: float, step: float) -> tuple[float, ...]:
    count = round((1.0 - low) / step) + 1
    return tuple(round(1.0 - step * i, 4) for i in range(count))


# Candidate shrink factors of each group's range for the error-minimising clipping search, per
# bit width. Measured on all-MiniLM-L6-v2 (group 64): the best ratio is 0.5-0.8 at 2 bits,
# 0.75-0.95 at 3, 0.9-1.0 at 4, and 1.0 at 6 bits and above, so each width searches its range.
_CLIP_RATIOS: dict[int, tuple[float, ...]] = {
    2: _ratios(0.4, 0.05),
    3: _ratios(0.6, 0.05),
    4: _ratios(0.75, 0.05),
    5: _ratios(0.85, 0.025),
}
_HIGH_BIT_RATIOS = (1.0, 0.975, 0.95)


def clip_ratios(bits: int) -> tuple[float, ...]:
    """Clip ratios searched by default at `bits` bits (always starting with 1.0: plain min/max)."""
    return _CLIP_RATIOS.get(bits, _HIGH_BIT_RATIOS)


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
    clip: tuple[float, ...] | None = None,
) -> Term:
    """Quantize a matrix group-wise, choosing per group the clip ratio with least squared error.

    Args:
        w2d: `[rows, cols]` float tensor.
        bits: bits per code, 2..8.
        group_size: elements per group along a row; None = per output channel.
        symmetric: signed codes with a scale only, instead of unsigned codes, scale and offset.
        clip: factors shrinking each group's range; `(1.0,)` is plain min/max rounding;
            None searches `clip_ratios(bits)`.

    Returns:
        The `Term` whose `dequantize` is the closest of the candidates to `w2d`, group by group.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8 for integer codes, got {bits}")
    return _quantize(w2d, bits=bits, group_size=group_size, symmetric=symmetric, clip=clip)[0]


def _quantize(
    w2d: Tensor, *, bits: int, group_size: int | None, symmetric: bool, clip: tuple[float, ...] | None
) -> tuple[Term, Tensor]:
    """`quantize_groups`, also returning the reconstruction `[rows, cols]` it computed.

    Accepts up to 16 bits (tied terms quantize on their combined grid, then split it)."""
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in 2..16 for integer codes, got {bits}")
    if w2d.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(w2d.shape)}")
    rows, cols = w2d.shape
    g = cols if group_size is None else min(group_size, cols)
    w = w2d.detach().float()
    wg, mask = _grouped(w, g)

    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        amax = wg.abs().amax(dim=-1, keepdim=True)
    else:
        qmin, qmax = 0, 2**bits - 1
        lo = wg.amin(dim=-1, keepdim=True)
        hi = wg.amax(dim=-1, keepdim=True)

    # For each candidate: u = (w - offset) / scale, codes round(u) clamped; the squared error of
    # the reconstruction codes * scale + offset is scale² Σ (codes - u)².
    best_err = best_scale = best_offset = None
    u = torch.empty_like(wg)
    for r in clip if clip is not None else clip_ratios(bits):
        if symmetric:
            scale = _to_fp16_grid(amax * (r / qmax)).clamp_min(_FP16_TINY)
            offset = None
            torch.div(wg, scale, out=u)
        else:
            scale = _to_fp16_grid((hi - lo) * (r / qmax)).clamp_min(_FP16_TINY)
            offset = _to_fp16_grid(lo * r)
            torch.sub(wg, offset, out=u).div_(scale)
        q = u.round().clamp_(qmin, qmax).sub_(u).square_()
        if mask is not None:
            q.mul_(mask)
        err = q.sum(dim=-1, keepdim=True).mul_(scale.square())
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
        codes = torch.div(wg, best_scale, out=u).round_().clamp_(qmin, qmax)
        rec = codes * best_scale
    else:
        codes = torch.sub(wg, best_offset, out=u).div_(best_scale).round_().clamp_(qmin, qmax)
        rec = codes * best_scale + best_offset
    code_type = torch.int32 if bits > 8 else torch.int8 if symmetric else torch.uint8
    term = Term(
        codes=codes.reshape(rows, -1)[:, :cols].to(code_type).contiguous(),
        scale=best_scale.squeeze(-1).half(),
        offset=None if best_offset is None else best_offset.squeeze(-1).half(),
        bits=bits,
        group_size=g,
    )
    return term, rec.reshape(rows, -1)[:, :cols]


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
    clip: tuple[float, ...] | None = None,
) -> list[Term]:
    """Multi-term residual quantization: term t quantizes what terms 1..t-1 left over."""
    if terms < 1:
        raise ValueError(f"terms must be at least 1, got {terms}")
    residual = w2d.detach().float()
    out: list[Term] = []
    for _ in range(terms):
        term = quantize_groups(residual, bits=bits, group_size=group_size, symmetric=symmetric, clip=clip)
        out.append(term)
        residual = residual - dequantize(term)
    return out


def dequantize_terms(terms: list[Term]) -> Tensor:
    """Sum of the reconstructions of all terms."""
    total = dequantize(terms[0])
    for term in terms[1:]:
        total += dequantize(term)
    return total


def residual_reconstructions(
    w2d: Tensor, *, bits: int, terms: int, group_size: int | None, symmetric: bool = False
) -> list[Tensor]:
    """Reconstructions with 1, 2, ..., `terms` terms, from one residual quantization run."""
    out: list[Tensor] = []
    w = w2d.detach().float()
    total = torch.zeros_like(w)
    for _ in range(terms):
        _, rec = _quantize(w - total, bits=bits, group_size=group_size, symmetric=symmetric, clip=None)
        total = total + rec
        out.append(total)
    return out


def quantize_tied(w2d: Tensor, *, bits: int, terms: int, group_size: int | None) -> list[Term]:
    """Tied terms: one `bits·terms`-bit asymmetric quantization split into `terms` digits of
    `bits` bits. Term t's step is the first's divided by 2^(bits·(t-1)); only term 1 carries
    the zero point (the sum reconstructs exactly the combined grid)."""
    full, _ = _quantize(w2d.detach().float(), bits=bits * terms, group_size=group_size, symmetric=False, clip=None)
    return split_digits(full, bits, terms)


def split_digits(full: Term, bits: int, terms: int) -> list[Term]:
    """Split a `bits·terms`-bit term into `terms` digits of `bits` bits, most significant
    first: digit t's scale is the full scale times 2^(bits·(terms-1-t)); only the first keeps
    the zero point, so the digits sum to exactly the full term."""
    code = full.codes.to(torch.int64)
    mask = (1 << bits) - 1
    out = []
    for t in range(terms):
        shift = bits * (terms - 1 - t)
        digit = ((code >> shift) & mask).to(torch.uint8)
        scale = (full.scale.float() * float(1 << shift)).half()
        out.append(Term(digit, scale, full.offset if t == 0 else None, bits, full.group_size))
    return out


def quantize_joint(
    w2d: Tensor, *, bits: int, terms: int, group_size: int | None, symmetric: bool = False, iters: int = 4
) -> list[Term]:
    """Jointly refined terms: start from residual terms, then alternate (a) a least-squares fit
    of every term's scale and the shared zero point per group, codes fixed, and (b) re-rounding
    each term's codes given the others. Per group, the best reconstruction seen is kept."""
    w = w2d.detach().float()
    rows, cols = w.shape
    init = quantize_residual(w, bits=bits, terms=terms, group_size=group_size, symmetric=symmetric)
    g = init[0].group_size
    wg, mask = _grouped(w, g)
    m = torch.ones_like(wg) if mask is None else mask.expand_as(wg)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)

    def grouped_codes(term: Term) -> Tensor:
        return _grouped(term.codes.float(), g)[0]

    codes = torch.stack([grouped_codes(t) for t in init])  # [T, rows, ng, g]
    scales = torch.stack([t.scale.float() for t in init]).unsqueeze(-1)  # [T, rows, ng, 1]
    zero = sum(t.offset.float() for t in init if t.offset is not None)
    zero = zero.unsqueeze(-1) if isinstance(zero, Tensor) else torch.zeros_like(scales[0])

    def error(sc: Tensor, z: Tensor) -> Tensor:
        rec = (codes * sc).sum(dim=0) + z
        return ((rec - wg).square() * m).sum(dim=-1, keepdim=True)

    best_err = error(scales, zero)
    best = (codes.clone(), scales.clone(), zero.clone())
    for _ in range(iters):
        # (a) least squares for [s_1..s_T, z] per group, codes fixed (a tiny ridge keeps it solvable).
        feats = torch.cat([codes, torch.ones_like(codes[:1])], dim=0) * m  # [T+1, rows, ng, g]
        a = torch.einsum("irgk,jrgk->rgij", feats, feats)
        b = torch.einsum("irgk,rgk->rgi", feats, wg * m)
        a = a + 1e-9 * a.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True).unsqueeze(-1) * torch.eye(terms + 1)
        theta = torch.linalg.solve(a, b.unsqueeze(-1)).squeeze(-1)  # [rows, ng, T+1]
        theta = _to_fp16_grid(theta)
        scales = theta[..., :terms].permute(2, 0, 1).unsqueeze(-1)
        scales = torch.where(scales.abs() < _FP16_TINY, torch.full_like(scales, _FP16_TINY), scales)
        zero = theta[..., terms:].clone()
        if symmetric:
            zero = torch.zeros_like(zero)
        # (b) re-round each term's codes against what the others leave.
        for t in range(terms):
            others = (codes * scales).sum(dim=0) - codes[t] * scales[t]
            codes[t] = ((wg - others - zero) / scales[t]).round().clamp(qmin, qmax)
        err = error(scales, zero)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = (
            torch.where(better.unsqueeze(0), codes, best[0]),
            torch.where(better.unsqueeze(0), scales, best[1]),
            torch.where(better, zero, best[2]),
        )
    codes, scales, zero = best
    out = []
    for t in range(terms):
        term_codes = codes[t].reshape(rows, -1)[:, :cols].to(torch.int8 if symmetric else torch.uint8).contiguous()
        offset = zero.squeeze(-1).half() if (t == 0 and not symmetric) else None
        out.append(Term(term_codes, scales[t].squeeze(-1).half(), offset, bits, g))
    return out


def quantize_terms(w2d: Tensor, choice: Choice) -> list[Term]:
    """The whole terms of `choice` (its extra share aside) for a matrix."""
    if choice.kind == "tied":
        return quantize_tied(w2d, bits=choice.bits, terms=choice.terms, group_size=choice.group_size)
    if choice.kind == "joint":
        return quantize_joint(
            w2d, bits=choice.bits, terms=choice.terms, group_size=choice.group_size, symmetric=choice.symmetric
        )
    return quantize_residual(
        w2d, bits=choice.bits, terms=choice.terms, group_size=choice.group_size, symmetric=choice.symmetric
    )
