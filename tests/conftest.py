"""Shared fixtures: small models built in code, and a tiny sentence-encoder folder on disk."""

import json
import shutil
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """A random 2-layer BERT (hidden 32) saved as a sentence-transformers folder.

    It reuses all-MiniLM-L6-v2's tokenizer (so the real text data tokenizes), but not its weights.
    """
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-encoder")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    _borrow_minilm_files(folder, "modules.json")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True})
    )
    return folder


@pytest.fixture(scope="session")
def tiny_causal_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama (hidden 64) saved with `transformers`, a causal LM folder.

    Like `tiny_encoder_dir` it reuses all-MiniLM-L6-v2's tokenizer, so the real text tokenizes.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-causal")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=30522,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    _borrow_minilm_files(folder)
    return folder


def _borrow_minilm_files(folder: Path, *extra: str) -> None:
    """Copy all-MiniLM-L6-v2's tokenizer (and any `extra` files) into a model folder."""
    from allocator.models import minilm_path

    src = minilm_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", *extra):
        shutil.copy(src / name, folder / name)
