"""The int4 CPU kernel path of packed Linear layers against the dequantizing path."""

import copy

import pytest
import torch
from torch import nn

import allocator
from allocator.quantized.export import _pack_term, export_quantized
from allocator.quantized.kernels import (
    DENSE_FROM,
    Int4Matmul,
    KernelLinear,
    blocked_layout,
    kernel_report,
    run_in_dtype_,
    unpack_codes,
    unsupported,
    use_kernels,
)
from allocator.quantized.load import load_quantized
from allocator.quantized.modules import PackedWeight, QuantEmbedding, QuantLinear
from profilers.quant.rotation import rotation_signs
from profilers.quant.rounding import layer_terms
from profilers.types import Choice
from tests.profilers.test_streaming import tiny_llama


def packed_weight(w: torch.Tensor, label: str) -> PackedWeight:
    """`w` stored as `label` (every other row taking a fractional choice's extra term)."""
    c, rows = Choice.parse(label), w.shape[0]
    terms = layer_terms(w, c.base)
    codes = [_pack_term(t, c.bits, c.symmetric) for t in terms]
    scales = [t.scale for i, t in enumerate(terms) if c.kind != "tied" or i == 0]
    zeros = [t.offset for i, t in enumerate(terms) if c.kind != "tied" or i == 0]
    extra = None
    if c.extra:
        index = torch.arange(1, rows, 2)[: c.extra_rows(rows)]
        x = layer_terms(w[index], c.next_term)[-1]
        extra = (index, _pack_term(x, c.bits, c.symmetric), x.scale, x.offset)
    signs = rotation_signs(w.shape[1]) if c.rotated else None
    return PackedWeight(tuple(w.shape), c, codes, scales, zeros, extra, signs=signs)


LABELS = [  # (label, columns): every bit width, symmetric or not, groups the kernel takes or repeats
    ("int2-g32", 128), ("int3s-g64", 128), ("int4-ch", 128), ("int4s-g32", 128), ("int5-g32", 128),
    ("int6s-g128", 256), ("int7-g64", 128), ("int8-g64", 128), ("int8s-ch", 192), ("int4-g96", 192),
    ("int2x2-g32", 128), ("int2x3j-g32", 128), ("int4x2t-g32", 128), ("int3x2-ch", 128),
    ("int3+3/8-g32", 128), ("int2x2+1/4-ch", 128), ("int5+1/2-g64", 128),
    ("int3+3/8-g32-had", 128), ("int4x2t-g32-had", 192), ("int2-g64-had", 2048),
]  # fmt: skip


@pytest.mark.parametrize(("label", "cols"), LABELS)
def test_the_kernel_computes_what_the_dequantized_weight_does(label, cols):
    torch.manual_seed(3)
    w = torch.randn(40, cols) * torch.linspace(0.2, 3, cols)  # 40 rows: the kernel pads to 48
    packed = packed_weight(w, label)
    x = torch.randn(5, 3, cols)
    want = x @ packed.dequantize().T
    prompt = torch.randn(DENSE_FROM + 4, cols)  # prompts expand the weight for a dense matmul
    fast_prompt = Int4Matmul(packed)(prompt)
    want_prompt = prompt @ packed.dequantize().T
    assert float((fast_prompt - want_prompt).norm() / want_prompt.norm()) < 1e-2, label
    exact = Int4Matmul(packed, torch.float32)
    assert exact(x).shape == want.shape
    assert torch.allclose(exact(x), want, rtol=1e-4, atol=1e-4 * float(want.abs().max())), label
    fast = Int4Matmul(packed)  # bfloat16 activations, scales and zeros
    y = fast(x)
    assert y.dtype == torch.float32
    assert float((y - want).norm() / want.norm()) < 1e-2, label
    assert torch.allclose(exact.dequantize(), packed.dequantize(), atol=1e-4 * float(w.abs().max())), label


def test_the_codes_read_back_from_the_pack_where_the_layout_is_known():
    block = blocked_layout()
    q = torch.randint(0, 16, (3 * 64, 96), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8)
    if block:  # x86: AVX512 or AVX2
        assert block in (32, 64) and torch.equal(unpack_codes(packed, 3 * 64, 96).int(), q)
    else:  # another layout: prompts stay on the kernel, which still computes the weight's product
        w = packed_weight(torch.randn(64, 96), "int4-g32")
        assert torch.allclose(Int4Matmul(w, torch.float32)(torch.eye(96)).T, w.dequantize(), atol=1e-5)


def test_the_kernel_holds_the_file_once_and_its_own_bfloat16_scales_for_four_bits():
    w = torch.randn(64, 512)
    packed = packed_weight(w, "int4-g64")
    file_bytes = sum(b.numel() * b.element_size() for b in packed.buffers())
    matmul = Int4Matmul(packed)
    assert matmul.weight_packed.nbytes == packed.codes_0.nbytes  # the 4-bit codes, once
    assert matmul.fine_meta.nbytes == packed.scale_0.nbytes + packed.zero_0.nbytes  # float16 scales and zeros
    own = matmul.scale_zeros.nbytes + matmul.owner.nbytes  # the kernel's bfloat16 copy, and which group is whose
    assert matmul.nbytes() <= file_bytes + own


@pytest.mark.parametrize(("label", "cols", "why"), [("int4-g32", 70, "row length 70"),
                                                    ("int4-g16", 128, "groups of 16")])  # fmt: skip
def test_what_the_kernel_cannot_take_says_why(label, cols, why):
    packed = packed_weight(torch.randn(16, cols), label)
    assert why in unsupported(packed)
    with pytest.raises(ValueError, match=why):
        Int4Matmul(packed)


def llama_file(tmp_path):
    """A 2-block random Llama planned at 4 bpw, exported: its data and its file."""
    model = tiny_llama(layers=2, tied=False)
    data = [{"input_ids": torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(k))} for k in range(2)]
    task = allocator.LogitsTask(causal=True)
    grid = allocator.choice_grid((2, 3, 4, 8), (1, 2), (32, None))
    plan = allocator.solve(model, data, task=task, budget="4bpw", choices=grid, fractions=4,
                           exclude=["lm_head", "model.embed_tokens"])  # fmt: skip
    return data, export_quantized(model, plan, tmp_path / "llama.safetensors", calibration=data, task=task)


def test_a_packed_llama_runs_on_kernels_and_generates_the_same_tokens(tmp_path):
    data, path = llama_file(tmp_path)
    slow = load_quantized(path, model=tiny_llama(layers=2, tied=False), kernels=False)
    exact = load_quantized(path, model=tiny_llama(layers=2, tied=False), compute_dtype=torch.float32)
    fast = load_quantized(path, model=tiny_llama(layers=2, tied=False))
    report = kernel_report(fast)
    assert len(report) == 14 and all(w.startswith("int4 kernel") for w in report.values()), report
    assert not any(isinstance(m, QuantLinear) for m in fast.modules())
    assert all(w.startswith("dequantized") for w in kernel_report(slow).values())
    prompt = data[0]["input_ids"][:1]
    for m in (slow, exact, fast):
        m.generation_config.pad_token_id = 0
    kwargs = {"max_new_tokens": 32, "do_sample": False, "use_cache": True}
    with torch.no_grad():
        reference = slow.generate(prompt, **kwargs)
        assert torch.equal(exact.generate(prompt, **kwargs), reference)
        a, b = slow(prompt).logits, fast(prompt).logits
    assert reference.shape[1] == prompt.shape[1] + 32
    assert float((a - b).norm() / a.norm()) < 2e-2


def test_a_model_on_bfloat16_kernels_computes_in_bfloat16_end_to_end(tmp_path):
    data, path = llama_file(tmp_path)
    fast = load_quantized(path, model=tiny_llama(layers=2, tied=False))
    floats = {p.dtype for p in fast.parameters() if p.is_floating_point()}
    assert floats == {torch.bfloat16}, floats  # embeddings, norms and the unplanned head
    with torch.no_grad():
        assert fast(data[0]["input_ids"]).logits.dtype == torch.bfloat16
    exact = load_quantized(path, model=tiny_llama(layers=2, tied=False), compute_dtype=torch.float32)
    assert {p.dtype for p in exact.parameters() if p.is_floating_point()} == {torch.float32}


def test_casting_a_model_keeps_tied_weights_tied_and_buffers_and_packed_scales_as_they_are():
    tied = run_in_dtype_(tiny_llama(layers=1, tied=True), torch.bfloat16)
    assert tied.lm_head.weight.dtype == torch.bfloat16
    assert tied.lm_head.weight is tied.model.embed_tokens.weight  # one tensor, cast once
    model = tiny_llama(layers=1, tied=False)
    frequencies = model.model.rotary_emb.inv_freq.clone()
    emb = model.model.embed_tokens
    packed = packed_weight(emb.weight.detach(), "int4-g32")
    model.model.embed_tokens = QuantEmbedding(emb, packed)
    run_in_dtype_(model, torch.bfloat16)
    assert torch.equal(model.model.rotary_emb.inv_freq, frequencies)  # buffers untouched (float32)
    assert packed.scale_0.dtype == torch.float16  # the packed scales stay as stored
    ids = torch.tensor([[1, 5, 7]])
    rows = model.model.embed_tokens(ids)
    assert rows.dtype == torch.bfloat16
    assert torch.equal(rows, packed.rows_of(ids.reshape(-1)).reshape(1, 3, -1).to(torch.bfloat16))


def test_a_model_reading_float_inputs_runs_in_the_compute_dtype_whatever_layer_comes_first(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    data = [torch.randn(8, 24) for _ in range(2)]
    plan = allocator.solve(model, data, budget="6bpw", method="rtn", fractions=0, exclude=["0"],
                           choices=allocator.choice_grid((4, 8), (1,), (32,)))  # fmt: skip
    path = export_quantized(model, plan, tmp_path / "mlp.safetensors")
    fast = load_quantized(path, model=copy.deepcopy(model))  # the first layer unplanned: float weights, cast
    assert isinstance(fast[0], nn.Linear) and fast[0].weight.dtype == torch.bfloat16
    assert all(w.startswith("int4 kernel") for w in kernel_report(fast).values())
    exact = load_quantized(path, model=copy.deepcopy(model), kernels=False)
    x = torch.randn(5, 24)  # float32, as a user's data comes
    with torch.no_grad():
        y, want = fast(x), exact(x)
    assert y.dtype == torch.bfloat16
    assert float((y.float() - want).norm() / want.norm()) < 2e-2


def test_layers_sharing_a_weight_share_the_kernel():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    packed = packed_weight(lin.weight.detach(), "int4-g32")
    model = nn.Sequential(QuantLinear(64, 32, packed, lin.bias.detach()), QuantLinear(64, 32, packed, None))
    use_kernels(model)
    assert all(isinstance(m, KernelLinear) for m in model)
    assert model[0].matmul is model[1].matmul
    x = torch.randn(2, 64)
    assert torch.equal(model[0](x) - lin.bias.detach(), model[1](x))
    ref = x @ packed.dequantize().T
    assert float((model[1](x) - ref).norm() / ref.norm()) < 2e-2


def test_generate_runs_a_packed_file_and_says_how_fast(tmp_path, cli):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # minilm's tokenizer: a vocabulary of 30522
    config = LlamaConfig(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    data = [{"input_ids": torch.randint(0, 30522, (2, 16), generator=torch.Generator().manual_seed(k))}
            for k in range(2)]  # fmt: skip
    grid = allocator.choice_grid((2, 4), (1,), (32,))
    plan = allocator.solve(model, data, task=allocator.LogitsTask(causal=True), budget="4bpw", method="rtn",
                           choices=grid, exclude=["lm_head", "model.embed_tokens"])  # fmt: skip
    rebuild = {"source": "transformers", "auto_class": "AutoModelForCausalLM", "init": {}, "config": config.to_dict()}
    path = export_quantized(model, plan, tmp_path / "llama.safetensors", rebuild=rebuild)
    res = cli("generate", str(path), "--tokenizer", "minilm", "--prompt", "the news today", "--tokens", "6")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("the news today")
    assert "generation: 5 tokens after the first" in res.stdout
    assert "14 of 14 packed layers on the int4 kernel" in res.stdout
    res = cli("generate", str(path), "--tokenizer", str(tmp_path / "nothing"))
    assert res.returncode == 2 and "no tokenizer in" in res.stderr and len(res.stderr.strip().splitlines()) == 1
