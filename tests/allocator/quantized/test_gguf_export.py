"""GGUF plans written as GGUF files: every tensor decodes (gguf-py) to exactly the weight the
applier computed, transformers reads the file back as the fake-quantized model, the file's size is
the plan's prediction, and bad requests are refused in one line with nothing written."""

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from allocator import api
from allocator.errors import AllocatorError, PlanError
from allocator.planning.build import plan_from_profile
from allocator.planning.plan import Constraints
from allocator.quantized.apply import quantize_plan_
from allocator.quantized.gguf_export import GgufSource, export_gguf
from allocator.sources import load_model
from profilers.quant.ggml.types import available_types
from profilers.quant.options import ggml_grid
from tests.gguf_models import HEADS, KV_HEADS, write_tiny_gguf

LAYERS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj"]  # fmt: skip


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A random Llama 256 wide (every block type fits its rows) as an F32 GGUF."""
    path = tmp_path_factory.mktemp("gguf") / "llama-256.F32.gguf"
    write_tiny_gguf(path, hidden=256, intermediate=512, seed=3)
    return path


def _batches(loaded, n: int = 4) -> list[dict]:
    torch.manual_seed(0)
    vocab = loaded.model.config.vocab_size
    return [{"input_ids": torch.randint(0, vocab, (2, 32)), "attention_mask": torch.ones(2, 32, dtype=torch.long)}
            for _ in range(n)]  # fmt: skip


@pytest.fixture(scope="module")
def profiled(source):
    loaded = load_model(str(source))
    batches = _batches(loaded)
    table = api.profile(loaded.model, batches, task=loaded.task, method="gptq-act", exclude=loaded.keep,
                        target_format="gguf", gguf_source=source, draws=1, choices=ggml_grid(["all"]))  # fmt: skip
    return loaded, batches, table


def _every_type_plans(table):
    """Plans that together give the 14 planned layers every block type the installed gguf can
    write, and fp16, by pins."""
    labels = [t.name for t in available_types()] + ["fp16"]
    names = table.names
    for start in range(0, len(labels), len(names)):
        pins = tuple((name, labels[(start + k) % len(labels)]) for k, name in enumerate(names))
        yield plan_from_profile(table, ["16bpw"], constraints=Constraints(pins=pins))


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def test_every_tensor_of_the_file_decodes_to_the_applied_weight(profiled, source, tmp_path):
    loaded, batches, table = profiled
    everything = {c.label for c in ggml_grid(["all"])}
    assert table.settings["format"] == "gguf" and {o.choice.label for o in table.layers[0].options} == everything
    plans = list(_every_type_plans(table))
    assert {lp.choice.label for p in plans for lp in p.layers.values()} == everything
    for plan in plans:
        _check_written(plan, source, loaded, batches, table, tmp_path)


def _check_written(plan, source, loaded, batches, table, tmp_path):
    assert plan.target_format == "gguf"
    model = load_model(str(source)).model
    made = quantize_plan_(model, plan, calibration=batches, task=loaded.task)
    out = export_gguf(model, plan, tmp_path / "plan.gguf", source=GgufSource(source, model), stored=made.layers)
    assert out.stat().st_size == plan.predicted.bytes  # exact: header, copied tensors, padded planned tensors
    written = {t.name: t for t in gguf.GGUFReader(out).tensors}
    original = {t.name: t for t in gguf.GGUFReader(source).tensors}
    assert list(written) == list(original)  # same tensors, same order
    mapping = GgufSource(source, model).param_tensor
    for name, lp in plan.layers.items():
        t = written[mapping[f"{name}.weight"]]
        assert t.tensor_type.name.lower() == ("f16" if lp.choice.label == "fp16" else lp.choice.label)
        decoded = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if ".attn_q." in t.name or ".attn_k." in t.name:
            decoded = _unpermute(decoded, HEADS if ".attn_q." in t.name else KV_HEADS)
        assert np.array_equal(decoded, made.layers[name].weight().numpy()), name
        assert t.n_bytes == next(o.bytes for o in table.layer(name).options if o.choice == lp.choice)  # the price
    for name, t in written.items():  # every other tensor as the source stores it
        if name not in {mapping[f"{n}.weight"] for n in plan.layers}:
            assert t.tensor_type == original[name].tensor_type
            assert np.array_equal(np.asarray(t.data), np.asarray(original[name].data)), name


def test_transformers_reads_the_file_as_the_fake_quantized_model(profiled, source, tmp_path):
    loaded, batches, table = profiled
    plan = plan_from_profile(table, ["4.5bpw"])
    fake = load_model(str(source)).model
    made = quantize_plan_(fake, plan, calibration=batches, task=loaded.task)
    out = export_gguf(fake, plan, tmp_path / "plan.gguf", source=GgufSource(source, fake), stored=made.layers)
    reread = load_model(str(out))
    with torch.no_grad():
        a = loaded.task.forward(fake, batches[0])
        b = loaded.task.forward(reread.model, batches[0])
    torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
    assert out.stat().st_size == plan.predicted.bytes <= plan.limits["bytes"] + plan.fixed_bytes + \
        plan.predicted.file_overhead  # fmt: skip


def test_a_file_size_budget_is_the_gguf_file(profiled):
    _, _, table = profiled
    whole = plan_from_profile(table, ["4.5bpw"]).predicted.bytes
    plan = plan_from_profile(table, [f"{whole - 20000}B"])
    assert plan.predicted.bytes <= whole - 20000
    assert plan.predicted.bytes == plan.predicted.quantized_bytes + table.fixed_bytes + table.file_overhead


def test_a_type_a_row_cannot_take_is_never_offered_and_a_pin_to_it_is_refused(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf64") / "llama-64.F32.gguf"
    write_tiny_gguf(path)  # 64 wide: no 256-element super-blocks
    loaded = load_model(str(path))
    table = api.profile(loaded.model, _batches(loaded, 2), task=loaded.task, exclude=loaded.keep,
                        target_format="gguf", gguf_source=path, draws=1)  # fmt: skip
    labels = {o.choice.label for layer in table.layers for o in layer.options}
    assert "q4_k" not in labels and {"q4_0", "iq4_nl", "q8_0", "fp16"} <= labels
    with pytest.raises(AllocatorError) as info:
        plan_from_profile(table, ["8bpw"], constraints=Constraints(pins=(("*.q_proj", "q4_k"),)))
    text = str(info.value)
    assert "\n" not in text and "model.layers.0.self_attn.q_proj" in text and "rows of 64 elements" in text
    assert "q4_0" in text and "cannot take q4_k" in text


def test_bad_requests_are_refused_in_one_line(profiled, source, tmp_path):
    loaded, batches, table = profiled
    with pytest.raises(AllocatorError, match="GGUF file the model was read from"):
        api.profile(loaded.model, batches, target_format="gguf", exclude=loaded.keep)
    native = api.profile(loaded.model, batches[:1], task=loaded.task, exclude=loaded.keep, draws=1)
    native_plan = plan_from_profile(native, ["5bpw"])
    made = quantize_plan_(load_model(str(source)).model, native_plan, calibration=batches[:1], task=loaded.task)
    with pytest.raises(PlanError, match="allocator's own format"):
        export_gguf(loaded.model, native_plan, tmp_path / "x.gguf", source=GgufSource(source, loaded.model),
                    stored=made.layers)  # fmt: skip
    assert not list(tmp_path.iterdir())
    gguf_plan = plan_from_profile(table, ["5bpw"])
    with pytest.raises(PlanError, match="--refine, --tune"):
        quantize_plan_(load_model(str(source)).model, gguf_plan.model_copy(update={"tune_steps": 2}),
                       calibration=batches, task=loaded.task)  # fmt: skip


def test_cli_writes_a_gguf_llama_cpp_reads(source, tmp_path, cli):
    text = tmp_path / "text.txt"
    text.write_text("\n".join("the cat sat on the mat and the hat in the sun" for _ in range(120)))
    common = ("--data", str(text), "--calibration", "8", "--max-length", "32", "--no-progress")
    res = cli("solve", "--model", str(source), "--format", "gguf", "--budget", "4.5bpw", "-o", "plan.json", *common,
              cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    res = cli("apply", "plan.json", "-o", "plan.safetensors", "--no-progress", cwd=tmp_path)
    assert res.returncode != 0 and "write it as a .gguf file" in res.stderr
    assert not (tmp_path / "plan.safetensors").exists()
    res = cli("apply", "plan.json", "-o", "plan.gguf", "--no-progress", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "(+0.00%)" in res.stdout and "max |difference| 0.00e+00" in res.stdout, res.stdout
    res = cli("solve", "--model", str(source), "--format", "gguf", "--bits", "3", "--budget", "4bpw", *common,
              cwd=tmp_path)  # fmt: skip
    assert res.returncode != 0 and "--bits describes allocator's own format" in res.stderr
    res = cli("solve", "--model", str(source), "--budget", "5bpw", "--bits", "4,8", "-o", "native.json", *common,
              cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    res = cli("apply", "native.json", "-o", "native.gguf", "--no-progress", cwd=tmp_path)
    assert res.returncode != 0 and "GGUF cannot hold" in res.stderr and "\n" not in res.stderr.strip()
    assert not (tmp_path / "native.gguf").exists()


@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "phi3"])  # biases; 1 + w norms; fused qkv and gate/up
def test_other_architectures_are_written_as_gguf_files_transformers_reads_back(arch, tmp_path):
    from tests.gguf_models import write_arch_gguf

    source = tmp_path / f"{arch}.F32.gguf"
    write_arch_gguf(source, arch)
    loaded = load_model(str(source))
    batches = _batches(loaded, n=2)
    table = api.profile(loaded.model, batches, task=loaded.task, method="gptq-act", exclude=loaded.keep,
                        target_format="gguf", gguf_source=source, draws=1)  # fmt: skip
    plan = plan_from_profile(table, ["5bpw"])
    assert len(plan.layers) == (8 if arch == "phi3" else 14)
    fake = load_model(str(source)).model
    made = quantize_plan_(fake, plan, calibration=batches, task=loaded.task)
    out = export_gguf(fake, plan, tmp_path / "plan.gguf", source=GgufSource(source, fake), stored=made.layers)
    assert out.stat().st_size == plan.predicted.bytes
    reread = load_model(str(out))
    with torch.no_grad():
        a = loaded.task.forward(fake, batches[0])
        b = loaded.task.forward(reread.model, batches[0])
        ref = loaded.task.forward(loaded.model, batches[0])
    torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
    assert float((a - ref).abs().max()) > 1e-4  # it was quantized
