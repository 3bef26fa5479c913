"""GPTQ: quantization with second-order error feedback (Frantar et al., 2022), for every term.

For a layer with inputs `X` and `H = XᵀX` (plus 1% of its mean diagonal as damping), columns
are quantized one at a time; each column's rounding error, divided by the diagonal of the
inverse Hessian's Cholesky factor, is fed back into the columns not yet quantized, so that
`‖(W − Ŵ)X‖` and not `‖W − Ŵ‖` is what the rounding minimises.

With `act_order` (method `gptq-act`), columns go by `H`'s diagonal, largest first, so the columns
that matter most are rounded while the most columns are left to absorb their error. Group
scales are then *static*: chosen (by the same clipping search as round-to-nearest) on the
weights before the sweep, per group of the original columns, so the packed groups stay
contiguous. In natural order they are chosen on the error-updated weights when a group is
reached. A test checks the sweep against a plainly written published algorithm, both orders.

One sweep (`gptq_sweep`) serves the profiler and the applier: it quantizes several matrices
of the same columns at once, each row with its own grid, so the profiler's error stack of
every choice and the applier's terms of one choice come from the same code.

Multi-term choices:

- residual: term 1 is GPTQ on `W`; term t is GPTQ on what the terms before left, with the same
  `H` (each pass minimises the output error of what is left);
- tied: GPTQ on the combined `bits·terms` grid, then split into digits (exactly as RTN);
- joint: the residual GPTQ terms, their zero points merged into term 1 (the weight-space
  least-squares refinement of `joint` would undo the output-space feedback, so it is not run).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..types import Choice
from .quantize import Term, _quantize, dequantize, dequantize_terms, split_digits

__all__ = [
    "Grid", "StaticGrid", "gptq_reconstructions", "gptq_static", "gptq_sweep", "gptq_terms", "memoized",
    "prepare_hessian",
]  # fmt: skip


class Grid(NamedTuple):
    """The integer grid one matrix of a sweep is rounded to."""

    bits: int
    group_size: int | None
    symmetric: bool


def prepare_hessian(h: Tensor, *, damp: float = 0.01) -> tuple[Tensor, Tensor]:
    """Damped `H` → (upper Cholesky factor of `H⁻¹`, dead-column mask). Columns no input ever
    reached (zero diagonal) are marked dead: their weights do not matter to the output."""
    h = h.double() if h.dtype != torch.float64 else h.clone()  # one float64 copy, changed in place
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * torch.diag(h).mean())
    # At most two float64 matrices at a time (an 8192-wide H: 0.54 GB each).
    chol = torch.linalg.cholesky(h)
    del h
    inv = torch.cholesky_inverse(chol)
    del chol
    return torch.linalg.cholesky(inv, upper=True).float(), dead


_INNER = 16  # columns per run of rank-1 updates inside a block


def _block_size(groups: Sequence[int], cols: int, block: int) -> int:
    """Blocks of whole groups for every group size: a multiple of their least common multiple."""
    step = math.lcm(*(g for g in groups if g < cols)) if any(g < cols for g in groups) else 1
    return step * max(1, block // step) if step > 1 else block


RoundColumn = Callable[[int, Tensor, Tensor], None]


def _lazy_sweep(wt: Tensor, hinv_u: Tensor, round_column: RoundColumn, *, block: int, inner: int) -> None:
    """The GPTQ column sweep over `wt` (`[cols, n]`, a column contiguous), updated in place.

    `round_column(col, x, out)` rounds column `col` (its error-updated values `x`) and writes the
    rounded values into `out`; its error, divided by `H⁻¹`'s Cholesky diagonal, is fed back
    lazily at two levels, as the published GPTQ does at one: inside a run of `inner` columns
    each column's error updates the rest of the run (rank-1); a finished run updates the rest of
    its block by one matrix product, and a finished block the columns after it by another.
    """
    cols = wt.shape[0]
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        err = torch.empty(stop - start, wt.shape[1])
        h = hinv_u[start:stop, start:stop]
        for run in range(start, stop, inner):
            end = min(run + inner, stop)
            for col in range(run, end):
                i = col - start
                x = wt[col]
                e = err[i]
                round_column(col, x, e)
                e.sub_(x).div_(-h[i, i])  # (x - rounded) / d
                if col + 1 < end:
                    wt[col + 1 : end].addr_(h[i, i + 1 : end - start], e, alpha=-1)
            if end < stop:
                a, b = run - start, end - start
                wt[end:stop].addmm_(h[a:b, b:].T, err[a:b], alpha=-1)
        if stop < cols:
            wt[stop:].addmm_(hinv_u[start:stop, stop:].T, err, alpha=-1)


def gptq_sweep(
    targets: Sequence[Tensor],
    grids: Sequence[Grid],
    hinv_u: Tensor,
    dead: Tensor,
    *,
    block: int = 128,
    order: Tensor | None = None,
    clip: tuple[float, ...] | None = None,
) -> list[Term]:
    """GPTQ-quantize several `[rows, cols]` matrices of the same columns in one column sweep.

    Their rows are stacked and each matrix is rounded to its own grid, with its own group
    parameters, so one sweep serves every choice of a layer (the profiler) or one (the applier).
    The weights are held transposed (`[cols, rows]`) and updated lazily (`_lazy_sweep`).

    Args:
        targets: matrices of equal shape (a layer's weight, or residuals of it).
        grids: one `Grid` per target.
        hinv_u: upper Cholesky factor of the damped `H⁻¹` (`prepare_hessian`).
        dead: columns no input reaches; their weights are zeroed.
        block: columns per lazy-update block (rounded to whole groups).
        order: the column order of the sweep (activation order: `H`'s diagonal, largest
            first), or None for natural order. With an order, `hinv_u` and `dead` are those of
            the permuted `H`, and group parameters are *static*: set from the matrix before
            the sweep, per group of the original columns, so the file's groups stay contiguous
            (`gptq_static`).
        clip: clip ratios searched for each group's range (`quantize.clip_ratios` when None;
            `(1.0,)` is plain min/max).

    Returns:
        One `Term` per target: codes, fp16 scales and zero points, as the packed file stores them.
    """
    rows, cols = targets[0].shape
    groups = [cols if g.group_size is None else min(g.group_size, cols) for g in grids]
    if order is not None:
        return _static_terms(targets, grids, groups, hinv_u, dead, order, clip, block)
    wt = torch.cat([t.float() for t in targets]).T.contiguous()  # [cols, n·rows]
    wt[dead] = 0.0
    qmin, qmax = _code_ranges(grids, rows)
    scale = torch.ones(len(grids) * rows)
    offset = torch.zeros(len(grids) * rows)  # stays 0 for symmetric grids
    codes = torch.empty(cols, len(grids) * rows)
    scales = [torch.zeros(rows, -(-cols // g), dtype=torch.float16) for g in groups]
    zeros = [None if grid.symmetric else torch.zeros(rows, -(-cols // g), dtype=torch.float16)
             for grid, g in zip(grids, groups, strict=True)]  # fmt: skip
    starts: dict[int, list[int]] = {}  # group size -> the grids that use it
    for c, g in enumerate(groups):
        starts.setdefault(g, []).append(c)

    def round_column(col: int, x: Tensor, out: Tensor) -> None:
        for g, cs in starts.items():
            if col % g == 0:
                _group_parameters(wt, col, g, cs, grids, rows, scale, offset, scales, zeros, clip)
        q = codes[col]
        torch.sub(x, offset, out=q).div_(scale).round_().clamp_(qmin, qmax)
        torch.addcmul(offset, q, scale, out=out)

    inner = math.gcd(_INNER, *(g for g in groups if g < cols))
    _lazy_sweep(wt, hinv_u, round_column, block=_block_size(groups, cols, block), inner=inner)
    return _terms(codes.T, grids, groups, scales, zeros, rows)


def _code_ranges(grids: Sequence[Grid], rows: int) -> tuple[Tensor, Tensor]:
    """Per stacked row, the lowest and highest code of its grid."""
    per_row = lambda values: torch.cat([torch.full((rows,), float(v)) for v in values])  # noqa: E731
    qmin = per_row(-(2 ** (g.bits - 1)) if g.symmetric else 0 for g in grids)
    qmax = per_row(2 ** (g.bits - 1) - 1 if g.symmetric else 2**g.bits - 1 for g in grids)
    return qmin, qmax


def _terms(
    codes: Tensor, grids: Sequence[Grid], groups: list[int], scales: list[Tensor], zeros: list[Tensor | None], rows: int
) -> list[Term]:
    """One `Term` per grid from the stacked codes `[n·rows, cols]` and each grid's parameters."""
    out = []
    for c, grid in enumerate(grids):
        code_type = torch.int32 if grid.bits > 8 else torch.int8 if grid.symmetric else torch.uint8
        term_codes = codes[c * rows : (c + 1) * rows].to(code_type).contiguous()
        out.append(Term(term_codes, scales[c], zeros[c], grid.bits, groups[c]))
    return out


def _group_parameters(
    wt: Tensor,
    col: int,
    g: int,
    grids_at: list[int],
    grids: Sequence[Grid],
    rows: int,
    scale: Tensor,
    offset: Tensor,
    scales: list[Tensor],
    zeros: list[Tensor | None],
    clip: tuple[float, ...] | None,
) -> None:
    """Scale and zero point of the group starting at `col` for each grid in `grids_at`, from the
    error-updated weights of the whole group (per channel: the untouched row, at column 0)."""
    for c in grids_at:
        sl = slice(c * rows, (c + 1) * rows)
        grp = wt[col : col + g, sl].T
        term, _ = _quantize(grp, bits=grids[c].bits, group_size=None, symmetric=grids[c].symmetric, clip=clip)
        scale[sl] = term.scale[:, 0].float()
        scales[c][:, col // g] = term.scale[:, 0]
        if term.offset is not None:
            offset[sl] = term.offset[:, 0].float()
            zeros[c][:, col // g] = term.offset[:, 0]  # type: ignore[index]


@dataclass(frozen=True)
class StaticGrid:
    """A grid fixed before the sweep, for one `[rows, cols]` matrix.

    Attributes:
        scale: `[rows, cols]` float32 step of each element's group.
        offset: `[rows, cols]` float32 value of code 0 of each element's group.
        qmin, qmax: the code range.
        levels: None for integer codes (value = code); else the sorted codebook, and codes are
            indices into it (value = `levels[code]`).
    """

    scale: Tensor
    offset: Tensor
    qmin: int
    qmax: int
    levels: Tensor | None = None

    def values(self, codes: Tensor) -> Tensor:
        """The grid values `codes` stand for, before scale and offset."""
        return codes.float() if self.levels is None else self.levels[codes.long()]


def gptq_static(
    targets: Sequence[Tensor],
    grids: Sequence[StaticGrid],
    hinv_u: Tensor,
    dead: Tensor,
    *,
    order: Tensor | None = None,
    block: int = 128,
) -> list[Tensor]:
    """GPTQ-round several `[rows, cols]` matrices onto grids fixed before the sweep, in one sweep.

    Args:
        targets: matrices of equal shape, in their original column order.
        grids: one `StaticGrid` per target (in the original column order).
        hinv_u, dead: `prepare_hessian` of `H`, permuted by `order` when one is given.
        order: the sweep's column order (None: natural).
        block: columns per lazy-update block.

    Returns:
        One code matrix `[rows, cols]` (int64, original column order) per target.
    """
    rows, cols = targets[0].shape
    perm = order if order is not None else torch.arange(cols)
    wt = torch.cat([t.float()[:, perm] for t in targets]).T.contiguous()  # [cols, n·rows], swept order
    wt[dead] = 0.0
    scale_at = torch.cat([g.scale[:, perm] for g in grids]).T.contiguous()
    offset_at = torch.cat([g.offset[:, perm] for g in grids]).T.contiguous()
    # A zero step (a group of zeros) rounds every value to the offset: divide by 1 there.
    divide_at = torch.where(scale_at == 0, 1.0, scale_at) if bool((scale_at == 0).any()) else scale_at
    qmin = torch.cat([torch.full((rows,), float(g.qmin)) for g in grids])
    qmax = torch.cat([torch.full((rows,), float(g.qmax)) for g in grids])
    codes = torch.empty(cols, len(grids) * rows)
    # Rows on a codebook are rounded to its nearest level (between the midpoints of neighbours).
    books = [(slice(k * rows, (k + 1) * rows), g.levels, (g.levels[1:] + g.levels[:-1]) / 2)
             for k, g in enumerate(grids) if g.levels is not None]  # fmt: skip
    uniform = all(g.levels is None for g in grids)

    def round_column(col: int, x: Tensor, out: Tensor) -> None:
        scale, offset, q = scale_at[col], offset_at[col], codes[col]
        if uniform:
            torch.sub(x, offset, out=q).div_(divide_at[col]).round_().clamp_(qmin, qmax)
            torch.addcmul(offset, q, scale, out=out)
            return
        u = torch.sub(x, offset).div_(divide_at[col])
        torch.round(u, out=q).clamp_(qmin, qmax)
        value = q.clone()
        for sl, levels, mids in books:
            idx = torch.bucketize(u[sl], mids)
            q[sl] = idx.float()
            value[sl] = levels[idx]
        torch.addcmul(offset, value, scale, out=out)

    _lazy_sweep(wt, hinv_u, round_column, block=block, inner=_INNER)
    out = torch.empty_like(codes)
    out[perm] = codes  # back to the original column order
    return [out.T[k * rows : (k + 1) * rows].long() for k in range(len(grids))]


def _static_terms(
    targets: Sequence[Tensor],
    grids: Sequence[Grid],
    groups: list[int],
    hinv_u: Tensor,
    dead: Tensor,
    order: Tensor,
    clip: tuple[float, ...] | None,
    block: int,
) -> list[Term]:
    """`gptq_sweep` in activation order: each grid's fp16 scales and zero points set from its
    matrix before the sweep (dead columns zeroed), per group of the original columns, then one
    static sweep."""
    dead_original = torch.empty_like(dead)
    dead_original[order] = dead
    rows, cols = targets[0].shape
    scales, zeros, static = [], [], []
    for target, grid, g in zip(targets, grids, groups, strict=True):
        w = target.float().clone()
        w[:, dead_original] = 0.0
        term, _ = _quantize(w, bits=grid.bits, group_size=g, symmetric=grid.symmetric, clip=clip)
        scales.append(term.scale)
        zeros.append(term.offset)
        group_of = torch.arange(cols) // g
        offset = torch.zeros_like(term.scale) if term.offset is None else term.offset
        qmin, qmax = _code_ranges([grid], 1)
        static.append(StaticGrid(term.scale.float()[:, group_of], offset.float()[:, group_of],
                                 int(qmin), int(qmax)))  # fmt: skip
    codes = gptq_static(targets, static, hinv_u, dead, order=order, block=block)
    return _terms(torch.cat(codes).float(), grids, groups, scales, zeros, rows)


def _grid(choice: Choice) -> Grid:
    """The grid of one GPTQ pass of `choice`: tied terms are one pass on their combined grid."""
    if choice.kind == "tied":
        return Grid(choice.bits * choice.terms, choice.group_size, False)
    return Grid(choice.bits, choice.group_size, choice.symmetric)


def _passes(choice: Choice) -> int:
    return 1 if choice.kind == "tied" else choice.terms


def _finish(choice: Choice, passes: list[Term]) -> list[Term]:
    """A choice's terms from its GPTQ passes: tied digits split, joint zero points merged."""
    if choice.kind == "tied":
        return split_digits(passes[0], choice.bits, choice.terms)
    if choice.kind == "joint" and not choice.symmetric:
        merged = sum(t.offset.float() for t in passes if t.offset is not None)
        return [Term(t.codes, t.scale, merged.half() if k == 0 else None, t.bits, t.group_size)  # type: ignore[union-attr]
                for k, t in enumerate(passes)]  # fmt: skip
    return passes


# Group ranges: None searches clip ratios by weight error; (1.0,) is plain min/max. On the same
# model and setting, with activation order: the search 60.0, min/max 77.2.
GRID_CLIP: tuple[float, ...] | None = None


def _prepared(
    h: Tensor, damp: float, act_order: bool, memo: dict[Any, Any] | None
) -> tuple[Tensor | None, tuple[Tensor, Tensor]]:
    """The column order (activation order, or None) and `prepare_hessian` of `H` in that order.

    `memo` (a dict the caller keeps for one layer) holds them for the next call with the same
    `H`: a layer whose error stack is built in row chunks (`--max-memory`) prepares its `H` once,
    not per chunk (an 8192-wide `H`: a Cholesky factorisation, an inverse and another factorisation)."""

    def make() -> tuple[Tensor | None, tuple[Tensor, Tensor]]:
        order = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else None
        return order, prepare_hessian(h if order is None else h[order][:, order], damp=damp)

    # a layer's plain and rotated H each have theirs
    return memoized(memo, ("prepared", damp, act_order, id(h)), h, make)


def memoized(memo: dict[Any, Any] | None, key: Any, source: Tensor, make: Callable[[], Any]) -> Any:
    """`make()`, kept in `memo` under `key` for later calls with the same `source` tensor (an
    `H` the value is derived from); without `memo`, made every time."""
    hit = memo.get(key) if memo is not None else None
    if hit is None or hit[0] is not source:
        hit = (source, make())
        if memo is not None:
            memo[key] = hit
    return hit[1]


def _all_terms(
    w2d: Tensor,
    h: Tensor,
    choices: Sequence[Choice],
    damp: float,
    act_order: bool = False,
    memo: dict[Any, Any] | None = None,
) -> list[list[Term]]:
    """The terms of every quantized choice, with one sweep per term index (all first terms
    together, then all second terms, ...).

    With `act_order`, first terms go in activation order, shared by every choice of one grid (a
    fractional option's rows add a term to exactly the base's first terms). Later terms go in
    natural order, with group ranges set on the error-updated residual."""
    w = w2d.detach().float()
    order, first = _prepared(h, damp, act_order, memo)
    natural = first if order is None else None
    passes: list[list[Term]] = [[] for _ in choices]
    residual = [w for _ in choices]
    for t in range(max((_passes(c) for c in choices if c.quantized), default=0)):
        live = [i for i, c in enumerate(choices) if c.quantized and _passes(c) > t]
        # Passes of the same grid over the same matrix are one (the first terms of int3 and int3x2).
        distinct = {(_grid(choices[i]), id(residual[i])): i for i in reversed(live)}
        swept = list(distinct.values())
        if t and natural is None:
            natural = _prepared(h, damp, False, memo)[1]
        hinv_u, dead = first if t == 0 else natural  # type: ignore[misc]
        terms = gptq_sweep([residual[i] for i in swept], [_grid(choices[i]) for i in swept], hinv_u, dead,
                           order=order if t == 0 else None, clip=GRID_CLIP)  # fmt: skip
        term_of = dict(zip(distinct, terms, strict=True))
        for i in live:
            passes[i].append(term_of[_grid(choices[i]), id(residual[i])])
            if _passes(choices[i]) > t + 1:  # another pass follows: it quantizes what this one left
                residual[i] = residual[i] - dequantize(passes[i][-1])
    return [_finish(c, p) if c.quantized else [] for c, p in zip(choices, passes, strict=True)]


def gptq_terms(
    w2d: Tensor, h: Tensor, choice: Choice, *, damp: float = 0.01, act_order: bool = False
) -> list[Term]:
    """The whole terms of `choice` for `w2d` `[rows, cols]` under GPTQ with `H` `[cols, cols]`."""
    return _all_terms(w2d, h, [choice], damp, act_order)[0]


def gptq_reconstructions(
    w2d: Tensor,
    h: Tensor,
    choices: list[Choice],
    *,
    damp: float = 0.01,
    act_order: bool = False,
    memo: dict[Any, Any] | None = None,
) -> list[Tensor]:
    """GPTQ reconstructions of `w2d` for many whole-term choices (fp16 for the fp16 choice),
    from the same sweeps `gptq_terms` runs for one (`memo`: see `_prepared`)."""
    w = w2d.detach().float()
    terms = _all_terms(w, h, choices, damp, act_order, memo)
    return [dequantize_terms(t) if c.quantized else w.half().float() for c, t in zip(choices, terms, strict=True)]
