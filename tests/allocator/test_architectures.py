"""Every causal-LM architecture users quantize most, as small random-config models built here:
the block chain is found and streams the whole model's scores, and a plan is applied, exported,
reloaded on the int4 kernels and generates what the dequantizing modules do."""

import pytest
import torch

import allocator
from allocator.errors import AllocatorError
from allocator.quantized.export import export_quantized
from allocator.quantized.kernels import kernel_report
from allocator.quantized.load import load_quantized
from profilers.blocks import find_blocks
from profilers.estimators.fisher import FisherProfiler
from profilers.layers import find_targets
from profilers.quant.options import choice_grid
from profilers.tasks import LogitsTask
from tests.lm_models import ARCHITECTURES, LAYERS, VOCAB, tiny_lm

SMALL = choice_grid((2, 4), (1,), (32,))
NO_EMBEDDINGS = ["lm_head", "model.embed_tokens"]


def batches(n: int = 3, length: int = 24):  # longer than the sliding windows
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(1, VOCAB, (2, length), generator=g)} for _ in range(n)]


def losses(table):
    return {(layer.spec.name, o.choice.label): o.loss for layer in table.layers for o in layer.options}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_architecture_streams_block_by_block_to_the_whole_model_scores(arch):
    model = tiny_lm(arch)
    targets = find_targets(model, exclude=["lm_head", "model.embed_tokens"])
    assert len(targets) == 2 * LAYERS.get(arch, 7)
    assert len(find_blocks(model, targets)) == 2
    kw = dict(choices=choice_grid((2, 4), (1,), (32,)), task=LogitsTask(causal=True), fractions=0, method="rtn",
              exclude=["lm_head", "model.embed_tokens"])  # fmt: skip
    streamed = FisherProfiler(stream=True).profile(model, batches(), **kw)
    whole = FisherProfiler(stream=False).profile(model, batches(), **kw)
    assert streamed.settings["blocks"] == 2 and whole.settings["blocks"] == 0
    a, b = losses(streamed), losses(whole)
    assert a.keys() == b.keys() and len(a) == len(targets) * 3  # fp16, int2, int4
    for key, value in a.items():
        assert b[key] == pytest.approx(value, rel=1e-3, abs=1e-12), key


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_architecture_is_planned_exported_and_runs_on_the_kernels(arch, tmp_path):
    model, data = tiny_lm(arch), batches()
    task = LogitsTask(causal=True)
    plan = allocator.solve(model, data, task=task, budget="4bpw", choices=choice_grid((2, 3, 4, 8), (1, 2), (32, None)),
                           fractions=4, exclude=["lm_head", "model.embed_tokens"])  # fmt: skip
    assert plan.predicted.bpw <= 4 and len(plan.layers) == 2 * LAYERS.get(arch, 7)
    path = export_quantized(model, plan, tmp_path / f"{arch}.safetensors", calibration=data, task=task)
    slow = load_quantized(path, model=tiny_lm(arch), kernels=False)
    fast = load_quantized(path, model=tiny_lm(arch))
    assert all(w.startswith("int4 kernel") for w in kernel_report(fast).values()), kernel_report(fast)
    prompt = data[0]["input_ids"][:1]
    with torch.no_grad():
        a, b = slow(prompt).logits, fast(prompt).logits
        ref = model(prompt).logits
    assert float((a - b).norm() / a.norm()) < 3e-2  # bfloat16 kernels against the exact dequantized weights
    assert 0 < float((a - ref).norm() / ref.norm()) < 0.2  # quantized, and close to the FP model
    slow.generation_config.pad_token_id = 0
    out = slow.generate(prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == prompt.shape[1] + 8


def test_tie_presets_hold_per_block_and_on_fused_projections_as_they_are():
    data = batches(2)
    plan = allocator.solve(tiny_lm("qwen2"), data, budget="3.5bpw", ties=["qkv", "gate_up"], fractions=0,
                           choices=SMALL, exclude=NO_EMBEDDINGS)
    for b in range(2):
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            parent = "self_attn" if group[0] == "q_proj" else "mlp"
            assert len({plan.layers[f"model.layers.{b}.{parent}.{n}"].choice.label for n in group}) == 1
    # phi3's qkv_proj and gate_up_proj are one layer each: the presets hold there as they are
    plan = allocator.solve(tiny_lm("phi3"), data, budget="3.5bpw", ties=["qkv", "gate_up"], fractions=0,
                           choices=SMALL, exclude=NO_EMBEDDINGS)
    assert "model.layers.1.self_attn.qkv_proj" in plan.layers
    with pytest.raises(AllocatorError, match="matches no group of layers in this model"):
        allocator.solve(tiny_lm("phi3"), data, budget="3.5bpw", ties=["qkv"], fractions=0, include=["*.mlp.*"],
                        choices=SMALL)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: soft-capped logits after the head
def test_a_large_head_runs_a_few_positions_at_a_time_to_the_same_scores(arch, monkeypatch):
    from profilers.estimators import segments

    model = tiny_lm(arch)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(1, VOCAB, (2, 128), generator=g),
             "attention_mask": torch.ones(2, 128, dtype=torch.long)} for _ in range(3)]  # fmt: skip
    kw = dict(choices=SMALL, task=LogitsTask(causal=True), fractions=0, method="rtn", exclude=NO_EMBEDDINGS)
    whole = FisherProfiler(stream=True).profile(model, data, **kw)
    chunks = []
    original = segments.SegmentPasses._head_in_chunks
    monkeypatch.setattr(segments, "HEAD_CHUNK_BYTES", 64 * VOCAB * 4)  # 64 positions' logits
    monkeypatch.setattr(segments.SegmentPasses, "_head_in_chunks",
                        lambda self, b, batch, rows: chunks.append(rows) or original(self, b, batch, rows))  # fmt: skip
    chunked = FisherProfiler(stream=True).profile(model, data, **kw)
    assert chunks == [64, 64, 64]  # every batch's head in 4 chunks of 64 positions, the draws as a whole pass's
    a, b = losses(whole), losses(chunked)
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert b[key] == pytest.approx(value, rel=1e-6, abs=1e-15), key
