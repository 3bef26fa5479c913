"""Text data: gensim's news corpus (`lee_background.cor`) and WordSim353, or the user's own
text files, split into disjoint calibration and evaluation documents and tokenized."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from ..errors import ModelError

__all__ = ["lee_documents", "load_documents", "split_documents", "text_batches", "wordsim353"]


def lee_documents() -> list[str]:
    """The 300 news documents of gensim's `lee_background.cor`, one string each."""
    try:
        from gensim.test.utils import datapath
    except ImportError:
        raise ModelError("the default text data needs gensim: pip install 'allocator[examples]'") from None
    lines = Path(datapath("lee_background.cor")).read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.strip() for line in lines if line.strip()]


def load_documents(data: str | None = None) -> tuple[list[str], str]:
    """Documents to calibrate and evaluate on, and a short description of where they came from.

    Args:
        data: None for the built-in news corpus (`lee_background.cor`); a text file (one
            document per non-empty line); or a folder (every `*.txt` file in it, by name).
    """
    if data is None:
        return lee_documents(), "lee_background.cor"
    path = Path(data)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ModelError(f"data folder {path} holds no .txt files")
    elif path.is_file():
        files = [path]
    else:
        raise ModelError(f"data {data!r} is neither a text file nor a folder of .txt files")
    docs = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ModelError(f"cannot read data file {f}: {e}") from None
        docs += [line.strip() for line in text.splitlines() if line.strip()]
    if len(docs) < 2:
        raise ModelError(f"data {data!r} has {len(docs)} non-empty line(s); calibration and evaluation need at least 2")
    return docs, str(path)


def wordsim353() -> list[tuple[str, str, float]]:
    """WordSim353 pairs with their mean human similarity (0-10), from gensim's test data."""
    from gensim.test.utils import datapath

    pairs = []
    for line in Path(datapath("wordsim353.tsv")).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        a, b, score = line.split("\t")[:3]
        pairs.append((a.strip(), b.strip(), float(score)))
    return pairs


def split_documents(docs: list[str], n_calibration: int, *, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint calibration and evaluation sets: `n_calibration` documents drawn with `seed`,
    the rest for evaluation (both keep corpus order)."""
    if not 0 < n_calibration < len(docs):
        raise ModelError(
            f"--calibration {n_calibration} does not fit {len(docs)} documents: use 1 to {len(docs) - 1}"
            " (the rest are held out)"
        )
    picked = set(random.Random(seed).sample(range(len(docs)), n_calibration))
    calib = [d for i, d in enumerate(docs) if i in picked]
    evaluation = [d for i, d in enumerate(docs) if i not in picked]
    return calib, evaluation


def text_batches(tokenizer: Any, texts: list[str], *, max_length: int = 128, batch_size: int = 16) -> list[dict]:
    """Tokenize `texts` into padded batches (dicts of tensors) of at most `batch_size`."""
    if tokenizer is None:
        raise ModelError("this model has no tokenizer, so it cannot read text data")
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size],
            max_length=max_length,
            truncation=True,
            padding=True,
            return_tensors="pt",
        )
        batches.append(dict(enc))
    return batches
