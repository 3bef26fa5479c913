"""The randomized Hadamard rotation: an exact orthogonal change of basis, priced and rounded
like any other choice, and worth its bits on weights with outlier columns."""

import pytest
import torch

from profilers.quant.cost import layer_bops, weight_bytes
from profilers.quant.options import choice_grid, with_rotation
from profilers.quant.rotation import rotate, rotate_hessian, rotation_block, rotation_signs, unrotate
from profilers.quant.rounding import error_stack, reconstruct
from profilers.types import Choice, LayerSpec


def _matrix(cols: int) -> torch.Tensor:
    """R itself, as the rotation of the identity."""
    return rotate(torch.eye(cols, dtype=torch.float64), rotation_signs(cols))


@pytest.mark.parametrize(("cols", "block"), [(576, 64), (1536, 512), (24, 8), (21, 1), (128, 128)])
def test_the_rotation_is_orthogonal_and_its_three_forms_agree(cols, block):
    assert rotation_block(cols) == block
    r = _matrix(cols)
    torch.testing.assert_close(r @ r.T, torch.eye(cols, dtype=torch.float64), rtol=0, atol=1e-12)
    for b in range(0, cols, block):  # block diagonal: nothing mixes across blocks
        outside = torch.cat([r[b : b + block, :b], r[b : b + block, b + block :]], dim=1)
        assert torch.count_nonzero(outside) == 0
    torch.manual_seed(cols)
    w = torch.randn(7, cols, dtype=torch.float64)
    x = torch.randn(50, cols, dtype=torch.float64)
    s = rotation_signs(cols)
    torch.testing.assert_close(rotate(w, s), w @ r)
    torch.testing.assert_close(unrotate(rotate(w, s), s), w)
    torch.testing.assert_close(rotate_hessian(x.T @ x, s), r.T @ (x.T @ x) @ r)
    torch.testing.assert_close(rotate(w, s) @ (x @ r).T, w @ x.T)  # W x = (W R)(Rᵀ x)
    assert torch.equal(rotation_signs(cols), s)  # the same signs on every call


@pytest.mark.parametrize("method", ["rtn", "gptq", "gptq-act"])
def test_rotated_choices_reconstruct_in_the_original_basis(method):
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    w[:, [5, 77]] *= 12  # outlier input channels, as in LLM weights
    x = torch.randn(400, 128) * torch.linspace(0.3, 2.0, 128)
    h = x.T @ x
    stack = [Choice.parse(label) for label in ("int3-g64", "int3-g64-had", "int2x2-ch-had", "int4x2t-g64-had")]
    errors = error_stack(w, stack, method=method, hessian=h)
    out_err = {}
    for k, c in enumerate(stack):
        rec = reconstruct(w, c, method=method, hessian=h)
        assert torch.equal(errors[k], rec - w), c.label  # what the profiler scores is what is applied
        out_err[c.label] = float(((x @ (rec - w).T) ** 2).sum())
    assert out_err["int3-g64-had"] < 0.6 * out_err["int3-g64"]  # the outliers no longer set every group's step


def test_rotation_costs_its_signs_and_its_transform():
    plain, turned = Choice(bits=3, group_size=64), Choice(bits=3, group_size=64, rotated=True)
    assert weight_bytes(576, 1536, turned) == weight_bytes(576, 1536, plain) + 1536 // 8
    spec = LayerSpec(name="l", kind="linear", shape=(576, 1536), rows=576, cols=1536, macs=576 * 1536 * 10)
    assert layer_bops(spec, turned, 8) - layer_bops(spec, plain, 8) == 10 * 1536 * 9 * 8  # log2(512) = 9 per input
    assert Choice.parse(turned.label) == turned and turned.label == "int3-g64-had"
    assert Choice.parse("int2x2+1/4-ch-had").rotated
    with pytest.raises(ValueError, match="rotation"):
        Choice(bits=16, rotated=True)


def test_grids_offer_rotation_as_asked():
    base = choice_grid((3,), (1, 2), (64,))
    assert [c.label for c in with_rotation(base, "hadamard")] == ["fp16", "int3-g64-had", "int3x2-g64-had"]
    assert len(with_rotation(base, "both")) == 2 * len(base) - 1
    assert with_rotation(base, "none") == base
    with pytest.raises(ValueError, match="unknown rotation 'givens'; choose one of none, hadamard, both"):
        with_rotation(base, "givens")
