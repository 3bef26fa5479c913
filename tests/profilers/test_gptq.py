"""One GPTQ sweep serves the profiler and the applier: what the profiler scores is exactly what
the applier produces, for every kind of term and every fraction."""

import pytest
import torch

from profilers.quant.gptq import Grid, gptq_sweep, prepare_hessian
from profilers.quant.options import expand_choices, layout_options, with_rotation
from profilers.quant.quantize import dequantize
from profilers.quant.rounding import Quantizer, reconstruct
from profilers.types import Choice

CHOICES = [
    Choice(bits=b, terms=t, group_size=g, symmetric=s, kind=k)
    for g in (16, None)
    for b in (2, 3, 4)
    for t in (1, 2, 3)
    for s in (False, True)
    for k in ("residual", "tied", "joint")
    if (t > 1 or k == "residual") and not (k == "tied" and s)
]


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    x = torch.randn(256, 48) * torch.linspace(0.2, 3.0, 48)  # uneven input energy, as real activations
    return torch.randn(24, 48), x.T @ x


@pytest.mark.parametrize("method", ["gptq", "gptq-act"])
def test_profiler_stack_is_the_applier_reconstruction_minus_the_weight(layer, method):
    w, h = layer
    options = expand_choices(with_rotation(CHOICES, "both"), 4, max_bits=8, max_terms=3)
    assert sum(c.extra > 0 for c in options) > 20  # fractions of residual choices are among them
    assert sum(c.extra > 0 and c.rotated for c in options) > 10  # rotated ones too
    layout = layout_options(options, w.shape[0])
    stack = Quantizer(method, {0: h}).stack(0, w, layout.stack)
    for k, choice in enumerate(layout.stack):  # whole-term choices
        applied = reconstruct(w, choice, method=method, hessian=h)
        torch.testing.assert_close(stack[k], applied - w, rtol=0, atol=1e-5, msg=choice.label)
    for j, choice in enumerate(options):  # fractions: the base with the next term on the chosen rows
        if not choice.extra:
            continue
        pair = layout.pairs[layout.pair[j]]
        rows = torch.randperm(w.shape[0])[: choice.extra_rows(w.shape[0])].sort().values
        scored = stack[pair.base].clone()
        scored[rows] = stack[pair.next][rows]
        applied = reconstruct(w, choice, method=method, hessian=h, extra_rows=rows)
        torch.testing.assert_close(scored, applied - w, rtol=0, atol=1e-5, msg=choice.label)


def test_a_batched_sweep_quantizes_each_matrix_as_alone(layer):
    w, h = layer
    hinv, dead = prepare_hessian(h)
    grids = [Grid(2, 16, False), Grid(4, None, True), Grid(3, 16, True)]
    targets = [w, w * 0.5, w.flip(1)]
    together = gptq_sweep(targets, grids, hinv, dead)
    for target, grid, term in zip(targets, grids, together, strict=True):
        (alone,) = gptq_sweep([target], [grid], hinv, dead)
        assert torch.equal(term.codes, alone.codes)
        torch.testing.assert_close(dequantize(term), dequantize(alone), rtol=0, atol=1e-6)


def _reference_gptq(w, h, bits, group, *, act_order, damp=0.01):
    """GPTQ as published (Frantar et al. 2022, Algorithm 1), written plainly: one column at a
    time, its error fed to every later column at once, no lazy blocks; float64. The grid is the
    project's: per row and group, fp16 scale `(max - min) / (2^bits - 1)` and fp16 offset `min`.
    With `act_order`, columns go by `H`'s diagonal, largest first, and the group parameters are
    static (from the weights before the sweep, per group of the original columns)."""
    w, h = w.double().clone(), h.double().clone()
    cols = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    qmax = 2**bits - 1

    def params(block):
        lo, hi = block.min(dim=1).values, block.max(dim=1).values
        scale = ((hi - lo) / qmax).clamp(-65504, 65504).half().double().clamp_min(2.0**-24)
        return scale, lo.clamp(-65504, 65504).half().double()

    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(cols)
    static = [params(w[:, g : g + group]) for g in range(0, cols, group)]
    w, h = w[:, perm], h[perm][:, perm]
    h += torch.eye(cols, dtype=h.dtype) * damp * torch.diag(h).mean()
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.zeros_like(w)
    for i in range(cols):
        if act_order:
            scale, offset = static[int(perm[i]) // group]
        elif i % group == 0:
            scale, offset = params(w[:, i : i + group])
        q = ((w[:, i] - offset) / scale).round().clamp(0, qmax) * scale + offset
        out[:, i] = q
        err = (w[:, i] - q) / hinv[i, i]
        w[:, i:] -= err[:, None] * hinv[i, i:][None, :]
    result = torch.empty_like(out)
    result[:, perm] = out
    return result


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(("bits", "group"), [(3, 16), (4, 48), (2, 16)])
def test_the_sweep_is_the_published_algorithm(layer, monkeypatch, act_order, bits, group):
    import profilers.quant.gptq as gptq

    w, h = layer
    h = h.clone()
    h[5] = h[:, 5] = 0.0  # a column no input reaches
    monkeypatch.setattr(gptq, "GRID_CLIP", (1.0,))
    choice = Choice(bits=bits, group_size=group)
    ours = reconstruct(w, choice, method="gptq-act" if act_order else "gptq", hessian=h)
    torch.testing.assert_close(ours.double(), _reference_gptq(w, h, bits, group, act_order=act_order),
                               rtol=0, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("method", ["gptq", "gptq-act"])
def test_row_chunks_sharing_a_memo_prepare_h_once_and_stack_as_the_whole(layer, method, monkeypatch):
    """`--max-memory` builds a layer's stack in row chunks: its `H` is rotated and factorised once."""
    import profilers.quant.gptq as gptq
    import profilers.quant.rounding as rounding

    w, h = layer
    stack = [c for c in with_rotation(CHOICES, "both") if c.terms <= 2]
    whole = Quantizer(method, {0: h}).stack(0, w, stack)
    calls = {"prepare": 0, "rotate": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(gptq, "prepare_hessian", counted("prepare", gptq.prepare_hessian))
    monkeypatch.setattr(rounding, "rotate_hessian", counted("rotate", rounding.rotate_hessian))
    memo: dict = {}
    parts = [Quantizer(method, {0: h}).stack(0, w[r : r + 8], stack, memo) for r in range(0, w.shape[0], 8)]
    assert torch.equal(torch.cat(parts, dim=1), whole)
    # plain and rotated bases, each with its natural-order factorisation for later terms under act-order
    assert calls == {"prepare": 4 if method == "gptq-act" else 2, "rotate": 1}
