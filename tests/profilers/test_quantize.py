"""Quantizer primitives against a slow, loop-per-group reference."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from profilers.quant.quantize import (
    as_matrix,
    clip_ratios,
    dequantize,
    dequantize_terms,
    n_groups,
    quantize_groups,
    quantize_residual,
    residual_reconstructions,
)
from profilers.quant.rounding import fake_quantize
from profilers.types import Choice


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-65504, 65504).half().float()


def reference(w2d, *, bits, group_size, symmetric, clip_ratios):
    """Quantize one group at a time, trying every clip ratio, keeping the least squared error."""
    rows, cols = w2d.shape
    g = cols if group_size is None else min(group_size, cols)
    out = torch.empty_like(w2d)
    for r in range(rows):
        for start in range(0, cols, g):
            seg = w2d[r, start : start + g]
            best_err, best_rec = None, None
            for ratio in clip_ratios:
                # The search scores a candidate by scale² Σ (codes - u)², u = (w - offset) / scale:
                # the squared error of codes * scale + offset, up to float rounding.
                if symmetric:
                    qmax = 2 ** (bits - 1) - 1
                    scale = _fp16(seg.abs().max() * (ratio / qmax)).clamp_min(2.0**-24)
                    u = seg / scale.expand_as(seg)
                    codes = u.round().clamp(-qmax - 1, qmax)
                    rec = codes * scale
                else:
                    qmax = 2**bits - 1
                    lo, hi = seg.min(), seg.max()
                    scale = _fp16((hi - lo) * (ratio / qmax)).clamp_min(2.0**-24)
                    offset = _fp16(lo * ratio)
                    u = (seg - offset) / scale.expand_as(seg)
                    codes = u.round().clamp(0, qmax)
                    rec = codes * scale + offset
                err = float(((codes - u) ** 2).sum() * scale**2)
                if best_err is None or err < best_err:
                    best_err, best_rec = err, rec
            out[r, start : start + g] = best_rec
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [8, 12, None])
@pytest.mark.parametrize("symmetric", [False, True])
def test_matches_slow_reference(seed, bits, group_size, symmetric):
    torch.manual_seed(seed * 1000 + bits * 100 + (group_size or 0))
    w = torch.randn(6, 40) * torch.rand(6, 1) * 3
    got = dequantize(quantize_groups(w, bits=bits, group_size=group_size, symmetric=symmetric))
    want = reference(w, bits=bits, group_size=group_size, symmetric=symmetric, clip_ratios=clip_ratios(bits))
    assert torch.equal(got, want)


def test_codes_and_metadata_shapes_and_ranges():
    w = torch.randn(5, 70)
    t = quantize_groups(w, bits=3, group_size=32, symmetric=False)
    assert t.codes.shape == (5, 70) and t.codes.dtype == torch.uint8
    assert t.scale.shape == (5, n_groups(70, 32)) == (5, 3) and t.scale.dtype == torch.float16
    assert int(t.codes.max()) <= 7
    s = quantize_groups(w, bits=3, group_size=32, symmetric=True)
    assert s.offset is None and s.codes.dtype == torch.int8
    assert int(s.codes.min()) >= -4 and int(s.codes.max()) <= 3


def test_clipping_search_never_worse_than_plain_minmax():
    torch.manual_seed(1)
    w = torch.randn(16, 128)
    w[0, 0] = 25.0  # an outlier that min/max rounding wastes levels on
    for bits in (2, 3, 4):
        plain = dequantize(quantize_groups(w, bits=bits, group_size=64, clip=(1.0,)))
        searched = dequantize(quantize_groups(w, bits=bits, group_size=64))
        assert ((searched - w) ** 2).sum() <= ((plain - w) ** 2).sum()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_error_falls_as_terms_grow(bits):
    torch.manual_seed(2)
    w = torch.randn(32, 256)
    errors = []
    for terms in (1, 2, 3):
        rec = dequantize_terms(quantize_residual(w, bits=bits, terms=terms, group_size=64))
        errors.append(float(((rec - w) ** 2).mean()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < errors[0] / 20


def test_residual_terms_quantize_what_the_previous_left():
    torch.manual_seed(3)
    w = torch.randn(4, 64)
    t1, t2 = quantize_residual(w, bits=2, terms=2, group_size=16)
    first = quantize_groups(w, bits=2, group_size=16)
    assert torch.equal(t1.codes, first.codes)
    second = quantize_groups(w - dequantize(first), bits=2, group_size=16)
    assert torch.equal(t2.codes, second.codes) and torch.equal(t2.scale, second.scale)


def test_fake_quantize_keeps_shape_dtype_and_fp16_rounds():
    w = torch.randn(8, 3, 3, 3)
    out = fake_quantize(w, Choice(bits=4, group_size=9))
    assert out.shape == w.shape and out.dtype == w.dtype
    assert torch.equal(fake_quantize(w, Choice.fp16()), w.half().float())
    assert torch.equal(as_matrix(w), w.reshape(8, 27))


def test_constant_and_zero_groups_are_exact():
    w = torch.zeros(3, 16)
    w[1] = 0.5
    for sym in (False, True):
        rec = dequantize(quantize_groups(w, bits=2, group_size=8, symmetric=sym))
        assert torch.allclose(rec, w, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 5),
    cols=st.integers(1, 50),
    bits=st.integers(2, 8),
    group=st.one_of(st.none(), st.integers(1, 64)),
    symmetric=st.booleans(),
)
def test_reconstruction_error_is_bounded_by_half_a_step(rows, cols, bits, group, symmetric):
    torch.manual_seed(rows * cols + bits)
    w = torch.randn(rows, cols)
    t = quantize_groups(w, bits=bits, group_size=group, symmetric=symmetric, clip=(1.0,))
    rec = dequantize(t)
    step = t.scale.float().repeat_interleave(t.group_size, dim=1)[:, :cols]
    # min/max rounding: every value lies within half a step (plus fp16 rounding of scale/offset).
    slack = 0.5 * step + 2e-3 * w.abs().amax() + 1e-6
    if not symmetric:
        slack = slack + step * 2**bits * 2**-10
    assert torch.all((rec - w).abs() <= slack)
    assert math.isfinite(float(rec.sum()))


def test_choice_labels_round_trip():
    for label in ["fp16", "int4-g64", "int2x2-g128", "int8s-ch", "int3x3-ch"]:
        assert Choice.parse(label).label == label
    with pytest.raises(ValueError, match="int4-g64"):
        Choice.parse("four bits")
    with pytest.raises(ValueError):
        Choice(bits=16, terms=2)
    with pytest.raises(ValueError):
        Choice(bits=9)


@pytest.mark.parametrize("symmetric", [False, True])
def test_search_reconstruction_is_exactly_what_the_codes_dequantize_to(symmetric):
    from profilers.quant.quantize import _quantize

    torch.manual_seed(7)
    w = torch.randn(9, 100) * 3
    for bits in (2, 4, 8):
        term, rec = _quantize(w, bits=bits, group_size=32, symmetric=symmetric, clip=None)
        assert torch.equal(rec, dequantize(term))
    recs = residual_reconstructions(w, bits=3, terms=3, group_size=32, symmetric=symmetric)
    terms = quantize_residual(w, bits=3, terms=3, group_size=32, symmetric=symmetric)
    for t in range(3):
        assert torch.equal(recs[t], dequantize_terms(terms[: t + 1]))


def test_tied_terms_are_the_finer_grid_split_into_digits():
    torch.manual_seed(11)
    w = torch.randn(6, 96)
    for bits, terms in ((2, 2), (4, 2), (3, 3)):
        tied = fake_quantize(w, Choice(bits=bits, terms=terms, group_size=32, kind="tied"))
        if bits * terms <= 8:
            assert torch.equal(tied, fake_quantize(w, Choice(bits=bits * terms, group_size=32)))
        from profilers.quant.quantize import quantize_tied

        digits = quantize_tied(w, bits=bits, terms=terms, group_size=32)
        assert all(int(d.codes.max()) < 2**bits for d in digits)
        assert digits[0].offset is not None and all(d.offset is None for d in digits[1:])
        assert torch.equal(dequantize_terms(digits), tied)


def test_joint_terms_are_never_worse_than_residual_ones():
    torch.manual_seed(12)
    w = torch.randn(16, 128) * torch.rand(16, 1)
    for bits, terms in ((2, 2), (3, 2), (2, 3)):
        residual = fake_quantize(w, Choice(bits=bits, terms=terms, group_size=32))
        joint = fake_quantize(w, Choice(bits=bits, terms=terms, group_size=32, kind="joint"))
        err_r = (residual - w).pow(2).reshape(16, 4, 32).sum(-1)
        err_j = (joint - w).pow(2).reshape(16, 4, 32).sum(-1)
        assert torch.all(err_j <= err_r * (1 + 1e-5))  # group by group
        assert err_j.sum() < 0.95 * err_r.sum()
