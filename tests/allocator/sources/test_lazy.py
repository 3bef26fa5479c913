"""Causal LMs read block by block (`sources.lazy`, `profilers.resident`): the same weights, scores
and packed file as the model loaded whole, with at most `capacity` blocks in memory between uses."""

import copy
import json
from pathlib import Path

import pytest
import torch

import allocator
from allocator.errors import ModelError
from allocator.quantized.apply import quantize_plan_
from allocator.quantized.export import export_quantized
from allocator.sources.gguf import load_gguf
from allocator.sources.lazy import lazy_from_folder, lazy_from_gguf
from profilers.resident import LazyBlocks, held, is_lazy
from profilers.tasks import LogitsTask
from tests.gguf_models import write_arch_gguf
from tests.lm_models import tiny_lm

pytest.importorskip("gguf")

TASK = LogitsTask(causal=True)


def _lazy(model: torch.nn.Module) -> LazyBlocks:
    owner = model.model.layers[0]
    from profilers.resident import _OWNER

    return _OWNER[owner][0]


def _batches(vocab: int, n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, vocab, (2, 16), generator=g)} for _ in range(n)]


def _same_state(lazy: torch.nn.Module, whole: torch.nn.Module) -> None:
    with held(*lazy.model.layers):
        ours = lazy.state_dict()
        theirs = whole.state_dict()
        assert set(ours) == set(theirs)
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), key


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("lazy") / "llama"
    model = tiny_lm("llama", layers=3)
    model.save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_a_folder_read_block_by_block_holds_the_saved_weights(arch, tmp_path):
    whole = tiny_lm(arch, layers=3)
    whole.save_pretrained(tmp_path)
    lazy = lazy_from_folder(tmp_path, "AutoModelForCausalLM", capacity=1)
    blocks = _lazy(lazy)
    assert blocks.resident() == [] and all(is_lazy(m) for m in lazy.model.layers[0].modules())
    assert not is_lazy(lazy.model.embed_tokens)
    x = _batches(300)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(lazy(x).logits, whole(x).logits, rtol=0, atol=0)
    assert blocks.resident() == [2] and blocks.loads == 3  # one block left in memory after a pass
    _same_state(lazy, whole)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_a_gguf_read_block_by_block_equals_the_whole_load(arch, tmp_path):
    """Per-tensor dequantization with transformers' own fixes (llama's q/k rows, gemma's norms)."""
    path = tmp_path / f"{arch}.gguf"
    write_arch_gguf(path, arch)
    whole = load_gguf(path, name="whole").model
    lazy = load_gguf(path, name="lazy", lazy=True).model
    assert _lazy(lazy).resident() == []
    _same_state(lazy, whole)
    x = _batches(200)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(lazy(x).logits, whole(x).logits, rtol=0, atol=0)
    assert len(_lazy(lazy).resident()) <= 2


def test_backward_through_a_lazy_model_sees_every_weight(llama_dir):
    """Blocks read with gradients on stay until the backward pass is done with them."""
    folder, whole = llama_dir
    lazy = lazy_from_folder(folder, "AutoModelForCausalLM", capacity=1)
    x = _batches(300)[0]["input_ids"]
    grads = []
    for model in (whole, lazy):
        model.zero_grad()
        model(x).logits.square().mean().backward()
        grads.append(model.model.layers[0].mlp.down_proj.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])
    assert len(_lazy(lazy).resident()) == 3  # kept: read with gradients on, never held


def test_profile_of_a_lazy_model_equals_the_whole_models(llama_dir):
    folder, whole = llama_dir
    lazy = lazy_from_folder(folder, "AutoModelForCausalLM", capacity=1)
    batches = _batches(300)
    options = dict(task=TASK, method="gptq", include=["model.layers.*"])
    a = allocator.profile(whole, batches, **options)
    b = allocator.profile(lazy, batches, **options)
    assert a.model_fingerprint == b.model_fingerprint
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert [o.loss for o in la.options] == [o.loss for o in lb.options], la.spec.name
    assert _lazy(lazy).loads > 3 and len(_lazy(lazy).resident()) <= 1  # read again as passes came back


@pytest.mark.parametrize("sequential", [False, True])
def test_apply_and_export_of_a_lazy_model_write_the_whole_models_file(llama_dir, tmp_path, sequential):
    folder, whole = llama_dir
    batches = _batches(300)
    table = allocator.profile(whole, batches, task=TASK, method="gptq", include=["model.layers.*"])
    plan = allocator.solve(table, budget="3.5 bits").model_copy(update={"sequential": sequential})
    files = []
    for name, model in (("whole", copy.deepcopy(whole)), ("lazy", lazy_from_folder(folder, "AutoModelForCausalLM", 1))):
        made = quantize_plan_(model, plan, calibration=batches, task=TASK)
        files.append(export_quantized(model, plan, tmp_path / f"{name}.safetensors", stored=made.layers))
    from safetensors import safe_open

    a, b = (safe_open(str(f), "pt") for f in files)
    assert a.metadata() == b.metadata() and set(a.keys()) == set(b.keys())
    for key in set(a.keys()):
        assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_a_copy_of_a_lazy_model_refuses_to_run(llama_dir):
    folder, _ = llama_dir
    lazy = lazy_from_folder(folder, "AutoModelForCausalLM")
    with pytest.raises(RuntimeError, match="copy of a model read block by block"):
        copy.deepcopy(lazy)(_batches(300)[0]["input_ids"])


def test_a_folder_missing_a_block_tensor_is_one_line(llama_dir, tmp_path):
    _, whole = llama_dir
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in whole.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    state.pop("lm_head.weight", None)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(whole.config.to_dict()))
    with pytest.raises(ModelError) as info:
        lazy_from_folder(tmp_path, "AutoModelForCausalLM")
    assert "\n" not in str(info.value) and "model.layers.1.mlp.up_proj.weight" in str(info.value)


def test_biases_are_read_with_their_blocks(tmp_path):
    """qwen2's q/k/v biases live in the blocks: read on use like the weights."""
    path = tmp_path / "qwen2.gguf"
    write_arch_gguf(path, "qwen2")
    whole, lazy = load_gguf(path, name="whole").model, lazy_from_gguf(path, capacity=1)
    assert lazy.model.layers[0].self_attn.q_proj.bias is not None
    x = _batches(200)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(lazy(x).logits, whole(x).logits, rtol=0, atol=0)
    assert _lazy(lazy).resident() == [1]


def test_hidden_states_of_a_lazy_model_go_to_the_spill_file(llama_dir):
    from profilers.blocks import Chain, Spilled, SpillFile

    folder, whole = llama_dir
    lazy = lazy_from_folder(folder, "AutoModelForCausalLM", capacity=1)
    chains = [Chain(list(m.model.layers)) for m in (whole, lazy)]
    assert chains[0].spill is None and chains[1].spill is not None
    for model, chain in zip((whole, lazy), chains, strict=True):
        with torch.no_grad(), chain.recording():
            model(_batches(300)[0]["input_ids"])
    assert all(isinstance(h, Spilled) for h in chains[1].hidden[0])
    for k in range(4):
        assert torch.equal(chains[0].input(0, k), chains[1].input(0, k))
    spill = SpillFile()
    for t in (torch.randn(3, 5), torch.randn(2, 7).bfloat16(), torch.empty(0, 4)):
        back = spill.put(t).load()
        assert back.dtype == t.dtype and torch.equal(back, t)


def test_a_lazy_model_counts_a_few_blocks_against_max_memory(llama_dir):
    from profilers.resident import resident_bytes

    folder, whole = llama_dir
    lazy = lazy_from_folder(folder, "AutoModelForCausalLM", capacity=1)
    block = sum(p.numel() * 4 for p in whole.model.layers[0].parameters())
    assert resident_bytes(whole) - resident_bytes(lazy) == block  # 3 blocks whole, 2 (capacity + one held) lazily


def test_a_folder_without_safetensors_is_loaded_whole(tmp_path):
    """`.bin` weights cannot be read one tensor at a time here: the folder loads as before."""
    from allocator.sources.hf import load_hf_folder

    whole = tiny_lm("llama", layers=2)
    whole.config.architectures = ["LlamaForCausalLM"]
    whole.config.save_pretrained(tmp_path)
    torch.save(whole.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = load_hf_folder(tmp_path, name="bin", lazy=True)
    assert not is_lazy(loaded.model.model.layers[0])
    x = _batches(300)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x).logits, whole(x).logits)
