"""llama.cpp's block types: exact bytes, bit-exact packing (decoded by gguf-py), grids at least
as good as gguf-py's reference quantizers, and GPTQ lowering the output error on each grid."""

import numpy as np
import pytest
import torch

from profilers.quant.cost import weight_bytes
from profilers.quant.ggml.fit import _codes, _levels, fit_grid, round_to_grid
from profilers.quant.ggml.pack import pack_ggml
from profilers.quant.ggml.quantize import quantize_ggml
from profilers.quant.ggml.types import GGML_TYPES, fitting_types, ggml_type, tensor_bytes
from profilers.types import Choice

gguf = pytest.importorskip("gguf")
from gguf import quants  # noqa: E402

TYPES = list(GGML_TYPES.values())


def _weights(rows: int = 12, cols: int = 512) -> torch.Tensor:
    """Rows that test the edges: an outlier column, a zero half-row, an all-positive row, a
    constant row, tiny values."""
    torch.manual_seed(0)
    w = torch.randn(rows, cols) * 0.02
    w[:, 5] *= 8
    w[0, :256] = 0
    w[1] = w[1].abs()
    w[2] = 0.01
    w[3] *= 1e-4
    return w


def _hessian(cols: int = 512) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(2048, cols) * torch.linspace(0.2, 3.0, cols)
    x[:, 7] *= 10
    x = x + 0.5 * x.roll(1, dims=1)  # correlated neighbours, as real activations
    return x.T @ x / 2048


def _decode_q2_0(raw: np.ndarray) -> np.ndarray:
    """llama.cpp's dequantize_row_q2_0 (ggml-quants.c), for a gguf package that lacks Q2_0:
    blocks of 64, an fp16 scale, then 2-bit codes, element j at byte j // 4, bits 2 (j % 4)."""
    blocks = raw.reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = (blocks[:, 2:, None] >> np.array([0, 2, 4, 6], dtype=np.uint8)) & 3
    return (d * (q.reshape(-1, 64).astype(np.float32) - 1)).reshape(raw.shape[0], -1)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("method", ["rtn", "gptq-act"])
def test_packed_bytes_decode_to_the_values_the_quantizer_computed(t, method):
    w, h = _weights(), _hessian()
    (tensor,) = quantize_ggml(w, [t], method=method, hessian=h)
    raw = pack_ggml(tensor)
    assert raw.dtype == np.uint8 and raw.shape == (12, 512 // t.block * t.block_bytes)
    assert raw.nbytes == tensor_bytes(12, 512, t) == weight_bytes(12, 512, Choice(ggml=t.name))
    if t.available:
        decoded = quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, t.gguf))
    else:
        assert t.gguf == "Q2_0"  # the one type llama.cpp's sources have and PyPI's gguf does not
        decoded = _decode_q2_0(raw)
    assert np.array_equal(decoded, tensor.dequantize().numpy()), t.name
    assert np.all(tensor.dequantize()[2].numpy() == decoded[2])  # the constant row too


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "mxfp4"])
def test_grids_are_at_least_as_close_as_gguf_reference_quantizers(name):
    t = GGML_TYPES[name]
    torch.manual_seed(2)
    w = torch.randn(64, 256) * torch.rand(64, 1) * 0.05
    ours = round_to_grid(w, fit_grid(w, t)).dequantize()
    qtype = getattr(gguf.GGMLQuantizationType, t.gguf)
    reference = torch.from_numpy(quants.dequantize(quants.quantize(w.numpy(), qtype), qtype))
    ours_err, ref_err = (ours - w).square().sum(), (reference - w).square().sum()
    assert ours_err <= ref_err * 0.999, (name, float(ours_err), float(ref_err))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_gptq_lowers_the_output_error_on_every_grid(t):
    w, h = _weights(32), _hessian()

    def output_error(rec: torch.Tensor) -> float:
        d = (rec - w).double()
        return float(torch.einsum("ij,jk,ik->", d, h.double(), d))

    rtn, gptq, act = (quantize_ggml(w, [t], method=m, hessian=h)[0].dequantize() for m in ("rtn", "gptq", "gptq-act"))
    assert output_error(gptq) < output_error(rtn) and output_error(act) < output_error(rtn), t.name


def test_importance_moves_the_error_to_the_columns_that_matter_less():
    t = GGML_TYPES["q4_0"]
    w = _weights()
    importance = torch.ones(512)
    importance[::2] = 100.0  # every block has columns of both kinds
    plain = round_to_grid(w, fit_grid(w, t)).dequantize() - w
    weighted = round_to_grid(w, fit_grid(w, t, importance)).dequantize() - w
    assert weighted[:, ::2].square().sum() < 0.9 * plain[:, ::2].square().sum()
    assert weighted[:, 1::2].square().sum() > plain[:, 1::2].square().sum()


@pytest.mark.parametrize("name", ["iq4_nl", "mxfp4"])
def test_codebook_lookup_equals_a_binary_search(name):
    t = GGML_TYPES[name]
    levels, mids = _levels(t)
    torch.manual_seed(3)
    u = torch.cat([torch.randn(20000) * 60, mids, mids + 1e-4, mids - 1e-4, levels, torch.tensor([-1e30, 1e30, 0.0])])
    assert torch.equal(_codes(u, t).long(), torch.bucketize(u, mids))


def test_a_row_length_picks_the_types_it_can_take():
    assert {t.name for t in fitting_types(576)} == {"q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl", "mxfp4", "q2_0"}
    assert len(fitting_types(1536)) == len(GGML_TYPES)
    assert fitting_types(100) == []
    with pytest.raises(ValueError, match="576 elements cannot be stored as Q4_K"):
        tensor_bytes(8, 576, GGML_TYPES["q4_k"])
    with pytest.raises(ValueError, match="unknown GGUF type 'q9_9'"):
        ggml_type("q9_9")


def test_the_default_grid_holds_the_types_the_installed_gguf_can_write_but_the_slow_ones():
    from profilers.quant.options import SLOW_GGML_TYPES, ggml_grid

    writable = {t.name for t in TYPES if t.gguf in gguf.GGMLQuantizationType.__members__}
    labels = [c.label for c in ggml_grid()]
    assert labels[0] == "fp16" and set(labels[1:]) == writable - set(SLOW_GGML_TYPES)
    assert {c.label for c in ggml_grid(["all"])} == writable | {"fp16"}
    assert "q4_k" in labels and ("q2_0" in labels) == hasattr(gguf.GGMLQuantizationType, "Q2_0")


def test_a_ggml_choice_is_its_type_alone():
    c = Choice.parse("Q4_K")
    assert (c.label, c.ggml, c.bits, c.family, c.quantized) == ("q4_k", "q4_k", 4, "ggml", True)
    assert Choice.parse(c.label) == c == Choice.model_validate_json(c.model_dump_json())
    assert Choice.parse("f16") == Choice.fp16() and Choice.fp16().family == "native"
    with pytest.raises(ValueError, match="fixes its bits and blocks"):
        Choice(ggml="q4_k", group_size=64)
    with pytest.raises(ValueError, match="unknown GGUF type"):
        Choice(ggml="q9_9")
