"""Text data: gensim's news corpus (`lee_background.cor`) and WordSim353, or the user's own
text files, split into disjoint calibration and evaluation documents and tokenized; or, for
causal LMs, one token stream cut into windows of equal length, split disjointly. And text of
another domain for evaluation only (`wikipedia_documents`)."""

from __future__ import annotations

import bz2
import random
import re
from pathlib import Path
from typing import Any

from ..errors import ModelError

__all__ = [
    "lee_documents",
    "load_documents",
    "split_documents",
    "split_windows",
    "text_batches",
    "token_windows",
    "wikipedia_documents",
    "window_batches",
    "wordsim353",
]

# Encyclopedia articles in gensim's test data: evaluation text of another domain than the news
# corpus the models calibrate on. Never calibrated or tuned on.
WIKIPEDIA_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


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
        data: None or "news" for the built-in news corpus (`lee_background.cor`); a text file
            (one document per non-empty line); or a folder (every `*.txt` file in it, by name).
    """
    if data is None or data == "news":
        return lee_documents(), "lee_background.cor"
    if data == "mix":
        raise ModelError("--data mix (news, code, docs and dialogue in token windows) is for causal LMs;"
                         " give --data news or your own text")  # fmt: skip
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


def wikipedia_documents() -> list[str]:
    """The articles of gensim's shortened English Wikipedia dump (`WIKIPEDIA_DUMP`) as plain text,
    one string per article (paragraphs joined by newlines), markup and redirects removed, in
    dump order. Text of another domain than `lee_background.cor`, kept for evaluation."""
    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
        from gensim.test.utils import datapath
    except ImportError:
        raise ModelError("the Wikipedia evaluation text needs gensim: pip install 'allocator[examples]'") from None
    docs = []
    with bz2.open(datapath(WIKIPEDIA_DUMP), "rt", encoding="utf-8") as f:
        for _title, markup, _page in extract_pages(f):
            text = re.sub(r"'{2,}", "", filter_wiki(markup))  # bold and italic quotes
            text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.MULTILINE)  # headings as plain lines
            lines = [re.sub(r"\s+", " ", line).strip() for line in text.splitlines()]
            lines = [line for line in lines if line and not line.startswith(("#REDIRECT", "#redirect"))]
            if sum(map(len, lines)) >= 200:
                docs.append("\n".join(lines))
    return docs


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


def token_windows(tokenizer: Any, docs: list[str], *, window: int) -> Any:
    """Non-overlapping windows of `window` token ids, `[n, window]` (a torch tensor), cut from one
    stream: the documents in order, each followed by the tokenizer's EOS token (its SEP token, or
    a newline, when it has none), tokenized without special tokens. The tail shorter than a
    window is dropped."""
    import torch

    if tokenizer is None:
        raise ModelError("this model has no tokenizer, so it cannot read text data")
    if window < 2:
        raise ModelError(f"--max-length {window} is too short for a window of next-token predictions: use 2 or more")
    end = getattr(tokenizer, "eos_token_id", None)
    end = end if isinstance(end, int) else getattr(tokenizer, "sep_token_id", None)  # BERT-style vocabularies
    sep = [end] if isinstance(end, int) else tokenizer("\n", add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:  # one call (a fast tokenizer batches it)
        stream += ids
        stream += sep
    n = len(stream) // window
    return torch.tensor(stream[: n * window], dtype=torch.long).reshape(n, window)


def split_windows(
    n: int, n_calibration: int, n_evaluation: int | None = None, *, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Disjoint calibration and evaluation window indices (each sorted): `n_calibration` drawn
    with `seed`, then at most `n_evaluation` (None: all the rest) of the others, drawn from the
    same shuffle, so a smaller evaluation set is a subset of a larger one."""
    if not 0 < n_calibration < n:
        raise ModelError(
            f"--calibration {n_calibration} does not fit {n} token windows: use 1 to {n - 1} (the rest are held out),"
            " or a shorter --max-length for more windows"
        )
    order = random.Random(seed).sample(range(n), n)
    rest = order[n_calibration:]
    if n_evaluation is not None:
        rest = rest[: max(n_evaluation, 0)]
    return sorted(order[:n_calibration]), sorted(rest)


def window_batches(windows: Any, indices: list[int], *, batch_size: int) -> list[dict]:
    """Batches of the windows at `indices`: `input_ids` and an all-ones `attention_mask` (no padding)."""
    import torch

    batches = []
    for i in range(0, len(indices), batch_size):
        ids = windows[torch.tensor(indices[i : i + batch_size], dtype=torch.long)]
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return batches
