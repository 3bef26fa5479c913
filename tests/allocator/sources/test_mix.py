"""The calibration mix of causal LMs, and the text of another domain they are evaluated on."""

import pytest
import torch

from allocator import sources
from allocator.cli.options import RecordedDataOptions
from allocator.errors import ModelError
from allocator.sources import LLM_BATCH_SIZE, LLM_CALIBRATION, LLM_EVALUATION
from allocator.sources.data import other_domain_batches
from allocator.sources.mix import MIX_PARTS, mix_documents, mix_shares
from profilers.types import DataSplit
from tests.gguf_models import POSITIONS, write_tiny_gguf

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    path = tmp_path_factory.mktemp("mix") / "tiny-llama.F32.gguf"
    write_tiny_gguf(path)
    return sources.load_model(str(path))


def test_the_shares_split_the_calibration_windows_and_keep_every_part():
    assert mix_shares(LLM_CALIBRATION) == {"news": 12, "code": 8, "docs": 6, "dialogue": 6}
    for n in (4, 7, 32, 100):
        shares = mix_shares(n)
        assert sum(shares.values()) == n and min(shares.values()) >= 1 and tuple(shares) == MIX_PARTS
    with pytest.raises(ModelError, match="--calibration 4 or more"):
        mix_shares(3)


def test_the_mix_holds_news_code_documentation_and_dialogue_in_several_languages():
    parts = mix_documents()
    assert tuple(parts) == MIX_PARTS and parts["news"] == sources.lee_documents()
    assert len(parts["code"]) >= 40 and all("def " in doc or "class " in doc for doc in parts["code"])
    assert len(parts["docs"]) >= 50 and any("statement" in doc for doc in parts["docs"])
    dialogue = parts["dialogue"]
    assert len(dialogue) > 1000 and all("\n" in doc for doc in dialogue)  # conversations of several turns
    assert any(any("\u3040" <= ch <= "\u30ff" for ch in doc) for doc in dialogue)  # Japanese kana
    assert any("¿" in doc for doc in dialogue)  # Spanish
    wikipedia = set(sources.wikipedia_documents())  # evaluation text is never part of the mix
    assert not any(doc in wikipedia for docs in parts.values() for doc in docs)


def _rows(batches: list[dict]) -> torch.Tensor:
    return torch.cat([b["input_ids"] for b in batches])


def test_the_mix_calibrates_part_by_part_and_holds_out_news(tiny_lm):
    data = sources.load_data(tiny_lm, "mix")
    window = min(sources.LLM_WINDOW, POSITIONS)
    assert (data.corpus, data.builtin, data.unit, data.max_length) == ("mix", True, "windows", window)
    assert (data.n_calib, data.n_eval, data.batch_size) == (LLM_CALIBRATION, LLM_EVALUATION, LLM_BATCH_SIZE)
    assert data.source.startswith("the calibration mix (news 12, code 8, docs 6, dialogue 6")
    calib = _rows(data.calib)
    start = 0
    for part, docs in mix_documents().items():  # each part's windows in its share, in order
        n = mix_shares(LLM_CALIBRATION)[part]
        own = {tuple(r) for r in sources.token_windows(tiny_lm.tokenizer, docs, window=window).tolist()}
        assert all(tuple(r) in own for r in calib[start : start + n].tolist()), part
        start += n
    news = {tuple(r) for r in sources.token_windows(tiny_lm.tokenizer, sources.lee_documents(), window=window).tolist()}
    held_out = [tuple(r) for r in _rows(data.evals).tolist()]
    assert set(held_out) <= news and not set(held_out) & {tuple(r) for r in calib.tolist()}

    split = DataSplit.model_validate_json(data.split().model_dump_json())  # as a profile or plan records it
    assert split.corpus == "mix" and split.builtin
    options = RecordedDataOptions().resolve(split)
    assert options.data == "mix"
    again = sources.load_data(tiny_lm, options.data, calibration=options.calibration, seed=options.seed,
                              max_length=options.max_length, batch_size=options.batch_size)  # fmt: skip
    assert torch.equal(_rows(again.calib), calib) and torch.equal(_rows(again.evals), _rows(data.evals))


def test_causal_lms_calibrate_on_the_news_by_default_and_older_files_read_it(tiny_lm):
    news = sources.load_data(tiny_lm)
    assert news.corpus == "news" and news.builtin and news.source.startswith("lee_background.cor")
    named = sources.load_data(tiny_lm, "news")
    assert named.corpus == "news" and named.builtin and torch.equal(_rows(named.calib), _rows(news.calib))
    older = DataSplit(source=news.source, unit="windows", calibration=32, evaluation=16, seed=0, max_length=128,
                      batch_size=2, builtin=True)  # a plan made before the mix: no corpus recorded
    assert RecordedDataOptions().resolve(older).data == "news"
    with pytest.raises(ModelError, match=r"--data mix .* is for causal LMs"):
        sources.load_documents("mix")
    with pytest.raises(ModelError, match="or name a built-in text: news, mix"):
        sources.load_data(tiny_lm, "no-such-file.txt")


def test_the_other_domain_is_wikipedia_windows_the_calibration_never_reads(tiny_lm):
    batches, name = other_domain_batches(tiny_lm, window=64, batch_size=2)
    rows = _rows(batches)
    assert rows.shape == (LLM_EVALUATION, 64) and name == f"{LLM_EVALUATION} Wikipedia windows"
    calib = _rows(sources.load_data(tiny_lm, "mix", max_length=64).calib)
    assert not {tuple(r) for r in rows.tolist()} & {tuple(r) for r in calib.tolist()}
