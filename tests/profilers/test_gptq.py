"""One GPTQ sweep serves the profiler and the applier: what the profiler scores is exactly what
the applier produces, for every kind of term and every fraction."""

import pytest
import torch

from profilers.quant.gptq import Grid, gptq_sweep, prepare_hessian
from profilers.quant.options import expand_choices, layout_options
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


def test_profiler_stack_is_the_applier_reconstruction_minus_the_weight(layer):
    w, h = layer
    options = expand_choices(CHOICES, 4, max_bits=8, max_terms=3)
    assert sum(c.extra > 0 for c in options) > 20  # fractions of residual choices are among them
    layout = layout_options(options, w.shape[0])
    stack = Quantizer("gptq", {0: h}).stack(0, w, layout.stack)
    for k, choice in enumerate(layout.stack):  # whole-term choices
        applied = reconstruct(w, choice, method="gptq", hessian=h)
        torch.testing.assert_close(stack[k], applied - w, rtol=0, atol=1e-5, msg=choice.label)
    for j, choice in enumerate(options):  # fractions: the base with the next term on the chosen rows
        if not choice.extra:
            continue
        pair = layout.pairs[layout.pair[j]]
        rows = torch.randperm(w.shape[0])[: choice.extra_rows(w.shape[0])].sort().values
        scored = stack[pair.base].clone()
        scored[rows] = stack[pair.next][rows]
        applied = reconstruct(w, choice, method="gptq", hessian=h, extra_rows=rows)
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
