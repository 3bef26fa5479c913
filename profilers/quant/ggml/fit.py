"""A tensor's llama.cpp block parameters, fitted by the error that matters, and the tensor that
those parameters and a matrix of codes store (`GgmlTensor`).

The error a block's parameters are chosen by is `Σ_i a_i (w_i - ŵ_i)²` over its elements, `a`
being each input column's importance: the diagonal of the layer's input second moment `H` (what
llama.cpp's importance matrix holds), or 1 without one. Per type family:

- one level, signed codes or a codebook (`Q4_0`, `Q5_0`, `Q8_0`, `IQ4_NL`): a search over step
  sizes mapping the block's extreme value to either end of the grid, from 30% inside to 30% past
  it, then two least-squares refits of the step with the codes fixed; steps are rounded to fp16
  before they are compared, so the error compared is the stored one;
- one level with a minimum (`Q4_1`, `Q5_1`): a search over the block's range shrunk from either
  end, then weighted least-squares refits of step and minimum;
- a power-of-two scale (`MXFP4`): the exponent that fits the extreme, and one either side;
- two levels (`Q2_K`..`Q6_K`, `IQ4_XS`): each sub-block fitted as above (without fp16 rounding,
  mins kept `<= 0` as llama.cpp stores them), the super-block's fp16 `d` (and `dmin`) chosen among
  candidates by the super-block's whole error, then each sub-block's integer scale (and min)
  moved by one step either way where that lowers its error.

llama.cpp (with an importance matrix) chooses its scales by a weighted search too; what it does not
do is feed each column's rounding error into the columns not yet rounded. Here the codes are
rounded onto the fitted grid by GPTQ (`profilers.quant.gptq.gptq_static`), or to nearest
(`round_to_grid`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from ..gptq import StaticGrid
from .types import GgmlType

__all__ = ["GgmlGrid", "GgmlTensor", "fit_grid", "round_to_grid"]

_FP16_MAX = 65504.0
_TINY = 1e-30
# Where a group's extreme lands, as a share of the grid's end (< 1: inside the grid, > 1: clipped),
# for the starting steps of a grid without a minimum.
_REACH = (1.0, 0.92, 1.08, 1.16, 0.84, 1.24, 1.32, 0.76, 0.7)
# Steps over a group's range beyond the grid's own (`qmax`), for the starting steps of a grid with
# a minimum: fewer steps leave codes unused (a 5-bit grid holds a 4-bit one at half the step).
_STEPS = (0.0, -0.5, -1.0, -1.5, -2.0, 0.5, 1.0, 1.5, 2.0, 3.0)
_SUPER_REACH = (1.0, 0.9, 1.1, 0.8)  # the same for a super-block's d over its sub-block scales


def _fp16(x: Tensor) -> Tensor:
    return x.clamp(-_FP16_MAX, _FP16_MAX).half().float()


@dataclass(frozen=True)
class GgmlGrid:
    """The fitted parameters of a `[rows, cols]` tensor in one type.

    Attributes:
        type: the block type.
        fields: what the file stores besides the codes, per the type's `scales`: `d` (and `m`)
            fp16 `[rows, blocks]`; `e` uint8 `[rows, blocks]`; two-level types: `d` (and `dmin`)
            fp16 `[rows, super-blocks]`, `sc` (and `mn`) int64 `[rows, sub-blocks]`.
        scale: `[rows, sub-blocks]` float32 effective step, exactly as llama.cpp computes it.
        offset: `[rows, sub-blocks]` float32 value of code 0 (zero without a minimum).
    """

    type: GgmlType
    fields: dict[str, Tensor]
    scale: Tensor
    offset: Tensor

    @property
    def levels(self) -> Tensor | None:
        return _levels(self.type)[0] if self.type.levels else None

    def static(self) -> StaticGrid:
        """The grid per element, for GPTQ (`gptq_static`)."""
        sub = self.type.sub
        return StaticGrid(self.scale.repeat_interleave(sub, dim=1), self.offset.repeat_interleave(sub, dim=1),
                          self.type.qmin, self.type.qmax, self.levels)  # fmt: skip


@dataclass(frozen=True)
class GgmlTensor:
    """A `[rows, cols]` tensor as one type stores it: the fitted grid and the codes.

    `codes` are int64 `[rows, cols]`: integers in `[qmin, qmax]`, or indices into the type's
    codebook (`GgmlType.levels`)."""

    grid: GgmlGrid
    codes: Tensor

    @property
    def type(self) -> GgmlType:
        return self.grid.type

    def dequantize(self) -> Tensor:
        """The float32 values llama.cpp decodes (bit for bit: `d·sc·q − dmin·mn` in float32)."""
        sub = self.type.sub
        levels = self.grid.levels
        values = self.codes.float() if levels is None else levels[self.codes]
        scale = self.grid.scale.repeat_interleave(sub, dim=1)
        return torch.addcmul(self.grid.offset.repeat_interleave(sub, dim=1), values, scale)


@functools.cache
def _levels(t: GgmlType) -> tuple[Tensor, Tensor]:
    """A codebook type's levels and the midpoints between neighbours (float32)."""
    levels = torch.tensor(t.levels, dtype=torch.float32)
    return levels, (levels[1:] + levels[:-1]) / 2


@functools.cache
def _bins(t: GgmlType) -> tuple[float, float, Tensor, Tensor]:
    """A lookup for the nearest level: the line cut into bins narrower than any two midpoints are
    apart (so a bin holds at most one), and per bin the midpoints below its start and the next.

    `torch.bucketize` is a binary search per element, 50x slower than rounding on this CPU; two
    table lookups and a comparison give the same indices."""
    mids = _levels(t)[1].double()
    width = float((mids[1:] - mids[:-1]).min()) / 2
    lo = float(mids[0]) - width
    n = int((float(mids[-1]) - lo) / width) + 2
    starts = lo + width * torch.arange(n, dtype=torch.float64)
    below = torch.searchsorted(mids, starts, right=False)  # midpoints strictly below each bin's start
    nxt = torch.cat([mids, torch.tensor([torch.inf], dtype=torch.float64)])[below]
    return lo, 1 / width, below, nxt.float()


def _normalized(x: Tensor, scale: Tensor, offset: Tensor | float) -> Tensor:
    """`(x - offset) / scale`, a zero step counting as 1 (its group holds one value)."""
    return torch.sub(x, offset).div_(torch.where(scale == 0, 1.0, scale))


def _codes(u: Tensor, t: GgmlType) -> Tensor:
    """Nearest codes of normalized values `u` (integer codes, or codebook indices), as floats; a
    value halfway between two levels takes the lower one (as `torch.bucketize` would)."""
    if not t.levels:
        return u.round().clamp_(t.qmin, t.qmax)
    lo, per, below, nxt = _bins(t)
    b = torch.sub(u, lo).mul_(per).floor_().clamp_(0, len(below) - 1).long().reshape(-1)
    idx = below.index_select(0, b).reshape(u.shape)
    return idx.add_(u > nxt.index_select(0, b).reshape(u.shape)).float()


def _values(codes: Tensor, t: GgmlType) -> Tensor:
    return codes if not t.levels else _levels(t)[0][codes.long()]


def _rounded(x: Tensor, scale: Tensor, offset: Tensor | float, t: GgmlType) -> Tensor:
    """Codes of `x` `[..., g]` on the grid `offset + value·scale` (`[..., 1]`)."""
    return _codes(_normalized(x, scale, offset), t)


def _error(x: Tensor, a: Tensor, scale: Tensor, offset: Tensor | float, t: GgmlType) -> tuple[Tensor, Tensor]:
    """Weighted squared error per group `[...]` of rounding `x` `[..., g]` to nearest, and the codes:
    `scale² Σ a (value(q) - u)²` with `u` the normalized weights."""
    u = _normalized(x, scale, offset)
    codes = _codes(u, t)
    gap = torch.sub(_values(codes, t), u, out=u).square_().mul_(a)  # u is not needed again
    err = gap.sum(-1).mul_(scale.square().squeeze(-1))
    zero = scale.squeeze(-1) == 0
    if zero.any():  # a zero step reconstructs the offset alone
        err = torch.where(zero, ((x - offset).square() * a).sum(-1), err)
    return err, codes


class _Best:
    """The lowest-error candidate per group seen so far (tensors `[..., 1]`)."""

    def __init__(self) -> None:
        self.err: Tensor | None = None
        self.values: list[Tensor] = []

    def offer(self, err: Tensor, *values: Tensor) -> None:
        err = err.unsqueeze(-1)
        if self.err is None:
            self.err, self.values = err, [v.expand_as(err).clone() for v in values]
            return
        better = err < self.err
        self.err = torch.where(better, err, self.err)
        self.values = [torch.where(better, v, old) for v, old in zip(values, self.values, strict=True)]


def _sums(*terms: Tensor) -> list[Tensor]:
    return [t.sum(-1, keepdim=True) for t in terms]


def _fit_signed(x: Tensor, a: Tensor, t: GgmlType, *, fp16: bool) -> Tensor:
    """Step `[..., 1]` of a grid without a minimum for groups `x` `[..., g]`: each candidate
    step gives codes, the codes the least-squares step, scored by its error with those codes."""
    ends = (t.levels[0], t.levels[-1]) if t.levels else (t.qmin, t.qmax)
    ext = x.gather(-1, x.abs().argmax(-1, keepdim=True))  # the signed extreme of each group
    ax = a * x
    (sxx,) = _sums(ax * x)
    best = _Best()
    for end in ends:
        for reach in _REACH:
            start = ext / (end * reach)
            v = _values(_rounded(x, start, 0.0, t), t)
            sxv, svv = _sums(ax * v, a * v * v)
            scale = torch.where(svv > 0, sxv / svv.clamp_min(_TINY), start)
            scale = _fp16(scale) if fp16 else scale
            best.offer((sxx - 2 * scale * sxv + scale * scale * svv).squeeze(-1), scale)
    return best.values[0]


def _fit_with_min(x: Tensor, a: Tensor, t: GgmlType, *, fp16: bool, nonpositive: bool) -> tuple[Tensor, Tensor]:
    """Step and offset `[..., 1]` of a grid with a minimum (`offset <= 0` when `nonpositive`):
    each candidate number of steps over the group's range gives codes, the codes the weighted
    least-squares step and offset, scored by their error with those codes."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    if nonpositive:
        lo = lo.clamp(max=0.0)
    span = hi - lo
    ax = a * x
    sa, sx, sxx = _sums(a, ax, ax * x)
    best = _Best()
    for steps in _STEPS:
        start = span / max(t.qmax + steps, 0.5)
        q = _rounded(x, start, lo, t)
        sq, sqq, sxq = _sums(a * q, a * q * q, ax * q)
        det = sqq * sa - sq * sq
        ok = det.abs() > _TINY * sa.square()
        scale = torch.where(ok, (sxq * sa - sx * sq) / torch.where(ok, det, 1.0), start)
        offset = torch.where(ok, (sqq * sx - sq * sxq) / torch.where(ok, det, 1.0), lo)
        if nonpositive:  # a positive offset is not storable: refit the step alone at offset 0
            pos = offset > 0
            scale = torch.where(pos, sxq / sqq.clamp_min(_TINY), scale)
            offset = torch.where(pos, 0.0, offset)
        if fp16:
            scale, offset = _fp16(scale), _fp16(offset)
        err = sxx - 2 * scale * sxq - 2 * offset * sx + scale * scale * sqq + 2 * scale * offset * sq + offset**2 * sa
        best.offer(err.squeeze(-1), scale, offset)
    return best.values[0], best.values[1]


def _fit_e8m0(x: Tensor, a: Tensor, t: GgmlType) -> Tensor:
    """E8M0 exponent byte `[..., 1]`: the step `2^(e-128)` with the least error."""
    amax = x.abs().amax(-1, keepdim=True)
    top = max(abs(v) for v in t.levels)
    k0 = torch.ceil(torch.log2(amax.clamp_min(_TINY) / top))
    best = _Best()
    for shift in (0, -1, 1):
        e = (k0 + shift + 128).clamp(2, 254)
        best.offer(_error(x, a, torch.exp2(e - 128), 0.0, t)[0], e)
    return torch.where(amax > 0, best.values[0], 2.0)


def _super(x: Tensor, t: GgmlType) -> Tensor:
    """Groups `[rows, sub-blocks, sub]` as `[rows, super-blocks, subs per super-block, sub]`, or
    one value per sub-block `[rows, sub-blocks, 1]` as `[rows, super-blocks, subs per super-block]`."""
    per = t.block // t.sub
    if x.shape[-1] == 1:
        return x.reshape(x.shape[0], -1, per)
    return x.reshape(x.shape[0], -1, per, t.sub)


def _quantize_scales(s: Tensor, d: Tensor, lo: int, hi: int) -> Tensor:
    return torch.where(d == 0, 0.0, (s / torch.where(d == 0, 1.0, d)).round().clamp(lo, hi))


def _two_level(x: Tensor, a: Tensor, t: GgmlType, s: Tensor, mu: Tensor | None) -> dict[str, Tensor]:
    """Super-block fields of a two-level type from the sub-block steps `s` (and mins `mu >= 0`),
    `[rows, super, subs]`; `x`, `a` are `[rows, super, subs, sub]`."""
    lo, hi = t.sc_range
    ext = s.gather(-1, s.abs().argmax(-1, keepdim=True)) if lo < 0 else s.amax(-1, keepdim=True)
    ends = (lo, hi) if lo < 0 else (hi,)
    dmin = None if mu is None else _fp16(mu.amax(-1, keepdim=True) / hi)
    mn = None if mu is None or dmin is None else _quantize_scales(mu, dmin, 0, hi)
    offset = 0.0 if mn is None else (-(dmin * mn)).unsqueeze(-1)
    best = _Best()  # per super-block
    for end in ends:
        for reach in _SUPER_REACH:
            d = _fp16(ext / (end * reach))
            sc = _quantize_scales(s, d, lo, hi)
            err = _error(x, a, (d * sc).unsqueeze(-1), offset, t)[0].sum(-1)
            best.offer(err, d)
    d = best.values[0]  # [rows, super, 1]
    sc = _quantize_scales(s, d, lo, hi)
    # Each sub-block's scale (and min) moved by one step where that lowers its error.
    steps = [(i, j) for i in (0, -1, 1) for j in ((0, -1, 1) if mn is not None else (0,))]
    local = _Best()
    for i, j in steps:
        sc_c = (sc + i).clamp(lo, hi)
        mn_c = None if mn is None else (mn + j).clamp(0, hi)
        off = 0.0 if mn_c is None else (-(dmin * mn_c)).unsqueeze(-1)  # type: ignore[operator]
        chosen = sc_c if mn_c is None else mn_c
        local.offer(_error(x, a, (d * sc_c).unsqueeze(-1), off, t)[0], sc_c.unsqueeze(-1), chosen.unsqueeze(-1))
    sc, mn_best = local.values[0].squeeze(-1), local.values[1].squeeze(-1)
    rows = x.shape[0]
    fields = {"d": d.reshape(rows, -1).half(), "sc": sc.reshape(rows, -1).long()}
    if mn is not None and dmin is not None:
        fields |= {"dmin": dmin.reshape(rows, -1).half(), "mn": mn_best.reshape(rows, -1).long()}
    return fields


def _effective(t: GgmlType, fields: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Effective step and offset per sub-block from the stored fields, as llama.cpp computes them."""
    if t.scales == "e8m0":
        scale = torch.exp2(fields["e"].float() - 128)
        return scale, torch.zeros_like(scale)
    if t.scales in ("d", "d_min"):
        scale = fields["d"].float()
        return scale, fields["m"].float() if "m" in fields else torch.zeros_like(scale)
    per = t.block // t.sub
    scale = fields["d"].float().repeat_interleave(per, dim=1) * fields["sc"].float()
    if "dmin" not in fields:
        return scale, torch.zeros_like(scale)
    return scale, -(fields["dmin"].float().repeat_interleave(per, dim=1) * fields["mn"].float())


def fit_grid(w2d: Tensor, t: GgmlType, importance: Tensor | None = None) -> GgmlGrid:
    """The parameters of `w2d` `[rows, cols]` in type `t`, chosen by the importance-weighted error.

    Args:
        w2d: the matrix (rows are output channels; blocks run along the columns).
        t: the block type; `cols` must be a multiple of its block.
        importance: `[cols]` non-negative weight of each column's error (the diagonal of `H`);
            None weighs every column alike.
    """
    rows, cols = w2d.shape
    if not t.fits(cols):
        raise ValueError(f"a row of {cols} elements cannot be stored as {t.gguf} (blocks of {t.block})")
    w = w2d.detach().float()
    a = torch.ones(cols) if importance is None else importance.detach().float().clamp_min(0)
    a = a + 1e-6 * a.mean().clamp_min(_TINY)  # no column weighs nothing: its codes stay defined
    x = w.reshape(rows, -1, t.sub)
    aw = a.reshape(1, -1, t.sub)
    if t.scales == "d":
        fields = {"d": _fit_signed(x, aw, t, fp16=True).squeeze(-1).half()}
    elif t.scales == "d_min":
        scale, offset = _fit_with_min(x, aw, t, fp16=True, nonpositive=False)
        fields = {"d": scale.squeeze(-1).half(), "m": offset.squeeze(-1).half()}
    elif t.scales == "e8m0":
        fields = {"e": _fit_e8m0(x, aw, t).squeeze(-1).to(torch.uint8)}
    elif t.scales == "k_sym":
        s = _fit_signed(x, aw, t, fp16=False)
        fields = _two_level(_super(x, t), _super(aw, t), t, _super(s, t), None)
    else:
        scale, offset = _fit_with_min(x, aw, t, fp16=False, nonpositive=True)
        fields = _two_level(_super(x, t), _super(aw, t), t, _super(scale, t), _super(-offset, t))
    scale, offset = _effective(t, fields)
    return GgmlGrid(t, fields, scale, offset)


def round_to_grid(w2d: Tensor, grid: GgmlGrid) -> GgmlTensor:
    """`w2d` rounded to the nearest values of a fitted grid (round to nearest, no feedback)."""
    rows, cols = w2d.shape
    x = w2d.detach().float().reshape(rows, -1, grid.type.sub)
    codes = _rounded(x, grid.scale.unsqueeze(-1), grid.offset.unsqueeze(-1), grid.type)
    return GgmlTensor(grid, codes.reshape(rows, cols).long())
