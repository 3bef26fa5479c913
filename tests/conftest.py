"""Shared fixtures: small models saved as folders on disk, and the `allocator` command run in
a subprocess (`cli`) with options that keep it fast (`fast`)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Options that keep a CLI profile of the tiny models to seconds.
FAST_OPTIONS = ("--calibration", "16", "--max-length", "32", "--draws", "2", "--no-progress", "--bits", "2,3,4,8")


def run_allocator(*args: str, cwd: Path | None = None, env: dict[str, str | None] | None = None, timeout: float = 600):
    """`python -m allocator ARGS` in a subprocess, its output captured as text (`env` values of
    None remove the variable)."""
    merged = {**os.environ, "COLUMNS": "160", **(env or {})}
    full_env = {k: v for k, v in merged.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "allocator", *args], capture_output=True, text=True, cwd=cwd,
                          env=full_env, timeout=timeout)  # fmt: skip


@pytest.fixture(scope="session")
def cli():
    """Run the `allocator` command: `cli("solve", "--budget", "3bpw", cwd=...)`."""
    return run_allocator


@pytest.fixture
def fast() -> list[str]:
    """CLI options that keep a profile of the tiny models to seconds."""
    return list(FAST_OPTIONS)


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
    from allocator.sources.zoo import minilm_path

    src = minilm_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", *extra):
        shutil.copy(src / name, folder / name)
