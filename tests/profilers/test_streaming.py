"""Block-streamed Fisher profiling: the same scores as one whole-model pass, within a memory
bound that all layers' error stacks together would not fit."""

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from profilers.blocks import find_blocks
from profilers.estimators.fisher import FisherProfiler
from profilers.layers import find_targets
from profilers.quant.options import choice_grid
from profilers.tasks import LogitsTask
from profilers.types import ProfileError
from tests.profilers.test_estimators import Blocks

CHOICES = choice_grid((2, 4), (1, 2), (32, None))


def tiny_llama(layers: int = 3, hidden: int = 64, inter: int = 128, tied: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, use_cache=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def batches(n: int = 3, length: int = 32):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 300, (2, length), generator=g)} for _ in range(n)]


def losses(table):
    return {(layer.spec.name, o.choice.label): o.loss for layer in table.layers for o in layer.options}


def assert_same(a, b, rel):
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys()
    for key, value in la.items():
        assert lb[key] == pytest.approx(value, rel=rel, abs=1e-12), key
    assert [x.channel_orders for x in a.layers] == [x.channel_orders for x in b.layers]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_block_by_block_gives_the_whole_model_scores(method):
    model = tiny_llama()
    assert len(find_blocks(model, find_targets(model))) == 3
    kw = dict(choices=CHOICES, task=LogitsTask(causal=True), fractions=4, method=method)
    streamed = FisherProfiler(stream=True).profile(model, batches(), **kw)
    whole = FisherProfiler(stream=False).profile(model, batches(), **kw)
    assert streamed.settings["blocks"] == 3 and whole.settings["blocks"] == 0
    # The tied embedding / LM head is scored from both of its segments (stem and head).
    assert "model.embed_tokens" in {layer.spec.name for layer in streamed.layers}
    assert_same(streamed, whole, rel=1e-5)


def test_a_memory_bound_builds_stacks_in_row_chunks_with_the_same_scores():
    model = tiny_llama()
    kw = dict(choices=CHOICES, task=LogitsTask(causal=True), fractions=4, method="gptq")
    whole_layers = FisherProfiler().profile(model, batches(), **kw)
    with pytest.raises(ProfileError, match=r"^--max-memory 1.00MB is too small: profiling .+ needs at least") as e:
        FisherProfiler(max_memory=10**6).profile(model, batches(), **kw)
    assert "\n" not in str(e.value)
    need = float(str(e.value).split("at least ")[1].split("MB")[0]) * 1e6
    chunked = FisherProfiler(max_memory=int(need) + 10**4).profile(model, batches(), **kw)  # 16-row chunks
    assert_same(whole_layers, chunked, rel=1e-5)


def test_a_model_that_is_not_a_chain_of_blocks_is_profiled_whole_with_a_warning():
    torch.manual_seed(2)
    model = Blocks()  # its residual is added outside the blocks: not a chain
    data = [torch.randint(0, 40, (4, 5)) for _ in range(2)]
    with pytest.warns(UserWarning, match="not block by block: block 1 is not fed the output of block 0"):
        table = FisherProfiler().profile(model, data, choices=CHOICES)
    assert table.settings["blocks"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(table, FisherProfiler(stream=False).profile(model, data, choices=CHOICES), rel=0)


_BOUNDED = """
import json, resource, sys, torch
torch.set_num_threads(1)
sys.path[:0] = {paths}
from tests.profilers.test_streaming import tiny_llama, batches
from profilers.estimators.fisher import FisherProfiler
from profilers.quant.options import choice_grid, expand_choices, layout_options
from profilers.layers import find_targets
from profilers.tasks import LogitsTask

model = tiny_llama(layers=8, hidden=256, inter=1024, tied=False)
data = batches(n=2, length=64)
with torch.no_grad():
    model(**data[0])  # libraries loaded, threads started
targets = find_targets(model, exclude=["model.embed_tokens", "lm_head"])
options = expand_choices(choice_grid(), 8)
every_stack = sum(len(layout_options(options, t.spec.rows).stack) * t.weight.numel() * 4 for t in targets)
vm = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
limit = vm + {room}
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    torch.empty(every_stack // 4)  # all stacks at once do not fit under the limit
    fits_all = True
except (MemoryError, RuntimeError):
    fits_all = False
table = FisherProfiler().profile(model, data, choices=choice_grid(), fractions=8, method="gptq",
                                 task=LogitsTask(causal=True), exclude=["model.embed_tokens", "lm_head"])
print(json.dumps({{"layers": len(table.layers), "blocks": table.settings["blocks"], "every_stack": every_stack,
                  "room": {room}, "fits_all": fits_all}}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_profile_streams_within_a_memory_limit_all_stacks_together_exceed():
    room = 400 * 2**20
    script = _BOUNDED.format(paths=json.dumps(sys.path), room=room)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=600, cwd=str(__import__("pathlib").Path(__file__).parents[2]))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["layers"] == 8 * 7 and result["blocks"] == 8
    assert result["every_stack"] > 2 * room and not result["fits_all"]


def test_sequential_hessians_come_per_input_group_and_see_the_quantized_layers_before():
    from profilers.input_hessians import input_hessians, streamed_hessians
    from profilers.quant.rounding import fake_quantize
    from profilers.types import Choice

    model, data, task = tiny_llama(layers=2, tied=False), batches(), LogitsTask(causal=True)
    targets = find_targets(model)
    name = [t.spec.name.rsplit(".", 1)[-1] for t in targets]
    fp = input_hessians(model, data, task, targets)
    groups = list(streamed_hessians(model, data, task, targets, sequential=True))
    order = [sorted(name[i] for i in g) for g in groups]
    block = [["k_proj", "q_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    assert order == [["lm_head"], *block, *block]  # the embedding is a lookup: no H
    for g in groups:  # nothing quantized: the full-precision H
        for i, h in g.items():
            torch.testing.assert_close(h, fp[i], rtol=1e-5, atol=1e-4)

    seen = {}
    for g in streamed_hessians(model, data, task, targets, sequential=True):
        seen.update(g)
        with torch.no_grad():  # quantize each group before asking for the next
            for i in g:
                targets[i].weight.copy_(fake_quantize(targets[i].weight, Choice(bits=2, group_size=32)))
    o_proj = name.index("o_proj")
    assert not torch.allclose(seen[o_proj], fp[o_proj], rtol=1e-3)  # its input came through 2-bit q, k, v


def test_a_replayed_block_attends_only_to_its_own_input_with_a_kv_cache_model():
    """A model left with `use_cache=True` passes its blocks a key/value cache. The recording
    drops it, so a block replayed on another input gives what a fresh forward pass gives, every
    time, instead of attending over the keys of the recorded call too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from profilers.blocks import Chain

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=True)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 300, (2, 16))
    other = torch.randint(0, 300, (2, 16))
    chain, fresh = Chain(list(model.model.layers)), Chain(list(model.model.layers))
    with torch.no_grad():
        with chain.recording():
            model(input_ids=ids)
        with fresh.recording():
            model(input_ids=other)
        moved = fresh.hidden[0][0]
        first = chain.calls[0][0].call(model.model.layers[0], moved)
        again = chain.calls[0][0].call(model.model.layers[0], moved)
    assert all("Cache" not in type(v).__name__ for v in chain.calls[0][0].kwargs.values())
    torch.testing.assert_close(first, fresh.hidden[0][1])
    assert torch.equal(first, again)


@pytest.mark.parametrize("stream", [True, False])
def test_batches_beyond_the_scored_ones_feed_every_layers_h(stream, monkeypatch):
    """With `scored`, the scores read some batches and GPTQ's `H` all of them: each layer's
    error stack is built on the `H` of every batch, block layers, head and tied weights alike."""
    from profilers.estimators.scoring import SegmentScorer
    from profilers.input_hessians import input_hessians

    model, data, task = tiny_llama(), batches(5), LogitsTask(causal=True)
    expected = input_hessians(model, data, task, find_targets(model))
    seen = {}
    hessian = SegmentScorer._hessian

    def spy(self, i, segment):
        seen[i] = hessian(self, i, segment).clone()
        return seen[i]

    monkeypatch.setattr(SegmentScorer, "_hessian", spy)
    table = FisherProfiler(stream=stream).profile(model, data, choices=CHOICES, task=task, method="gptq", scored=2)
    assert table.settings["scored_batches"] == 2 and table.settings["samples"] == 4  # 2 batches of 2 windows
    assert seen.keys() == expected.keys() and len(seen) == 3 * 7 + 1  # 7 per block, and the tied LM head
    for i, h in seen.items():
        torch.testing.assert_close(h, expected[i].float(), rtol=1e-5, atol=1e-3)


def test_scored_batches_are_what_the_scores_read():
    """Under round-to-nearest nothing reads `H`: scoring 2 of 5 batches is profiling those 2
    (evenly spaced: the first and the third)."""
    model, data = tiny_llama(), batches(5)
    kw = dict(choices=CHOICES, task=LogitsTask(causal=True), method="rtn")
    part = FisherProfiler().profile(model, data, scored=2, **kw)
    alone = FisherProfiler().profile(model, [data[0], data[2]], **kw)
    assert_same(part, alone, rel=1e-6)
    with pytest.raises(ProfileError, match="at least 1"):
        FisherProfiler().profile(model, data, scored=0, **kw)


def test_hessian_sums_share_one_tensor_per_input_and_add_in_place():
    """q, k and v, fed one input, share one `H` sum over every batch (one tensor, added to in
    place), equal to each call's `Σ x xᵀ` summed on its own."""
    from profilers.capture import capture_calls
    from profilers.input_hessians import accumulate_hessians, call_hessian

    model, data = tiny_llama(layers=1), batches(3)
    targets = find_targets(model)
    index = {t.spec.name: i for i, t in enumerate(targets)}
    q, k, v = (index[f"model.layers.0.self_attn.{n}_proj"] for n in "qkv")
    sums, naive = {}, {}
    with torch.no_grad():
        for batch in data:
            with capture_calls(targets, batch, isolate=False) as calls:
                model(**batch)
            first = sums.get(q)
            accumulate_hessians(sums, calls, batch)
            assert first is None or sums[q] is first  # the same tensor after every batch
            for call in calls:
                h = call_hessian(call, batch)  # None for the embedding
                if h is not None:
                    naive[call.target] = naive[call.target] + h if call.target in naive else h
    assert sums[q] is sums[k] is sums[v] and sums[q] is not sums[index["model.layers.0.self_attn.o_proj"]]
    assert sums.keys() == naive.keys()
    for i in sums:
        torch.testing.assert_close(sums[i], naive[i], rtol=1e-12, atol=1e-9)
