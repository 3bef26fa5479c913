"""The calibration and held-out data a model reads, split disjointly and batched (defaults:
`allocator.sources.DEFAULT_CALIBRATION`, ...; for causal LMs reading text, token windows with
`allocator.sources.LLM_WINDOW`, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from profilers.tasks import infer_task
from profilers.types import DataSplit

from ..errors import ModelError
from . import (
    BUILTIN_TEXTS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_CALIBRATION,
    DEFAULT_MAX_LENGTH,
    DEFAULT_SEED,
    LLM_BATCH_SIZE,
    LLM_CALIBRATION,
    LLM_EVALUATION,
    LLM_WINDOW,
    MNIST_CALIBRATION,
    user,
)
from .models import LoadedModel
from .text import load_documents, split_documents, split_windows, text_batches, token_windows, window_batches

__all__ = ["Data", "default_calibration_windows", "default_window", "load_data", "other_domain_batches"]


@dataclass
class Data:
    """Disjoint calibration and evaluation batches for one model, and where they came from."""

    calib: list
    evals: list
    source: str
    unit: str  # what one item is: "documents", "windows" (of max_length tokens), "images", "samples"
    n_calib: int
    n_eval: int
    texts: list[str] | None = None  # the held-out documents, for text models
    seed: int = DEFAULT_SEED
    max_length: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    builtin: bool = True  # the model's own data, no --data given
    corpus: str | None = None  # the built-in text read: news or mix

    def split(self) -> DataSplit:
        """What a profile and plan record of this split, to rebuild it later."""
        return DataSplit(
            source=self.source,
            unit=self.unit,
            calibration=self.n_calib,
            evaluation=self.n_eval,
            seed=self.seed,
            max_length=self.max_length,
            batch_size=self.batch_size,
            builtin=self.builtin,
            corpus=self.corpus,
        )


def load_data(
    loaded: LoadedModel,
    data: str | None = None,
    *,
    calibration: int | None = None,
    seed: int = DEFAULT_SEED,
    max_length: int | None = None,
    batch_size: int | None = None,
    evaluation: int | None = None,
) -> Data:
    """The calibration and held-out batches a model reads, split disjointly with `seed`.

    `data` is a text file or folder of `.txt` files (models with a tokenizer), a tensor file or an
    image folder (`allocator.sources`), or a built-in text: "news" (`lee_background.cor`) or "mix"
    (news, code, documentation and dialogue, `mix`; causal LMs only). None means the model's own
    data: the news for text models, the 5,000 MNIST images for `lenet-mnist`. A model loaded
    without a known output kind gets it here, from one forward pass on a calibration batch.

    A causal LM (`kind` "causal-lm") reads text as token windows (`text.token_windows`): the
    documents joined into one stream, cut into windows of `max_length` tokens, `calibration`
    windows drawn with `seed` and at most `evaluation` of the others held out. The other models
    read one document per item, cut at `max_length` tokens, and hold out all the rest.

    `calibration`, `max_length` and `batch_size` left None take the model's defaults: for a causal
    LM reading text `LLM_CALIBRATION` windows of `LLM_WINDOW` tokens (at most its
    `max_position_embeddings`; fewer windows on a short text, `default_calibration_windows`),
    `LLM_EVALUATION` held out; `LLM_BATCH_SIZE` for a causal LM on any
    data; `MNIST_CALIBRATION` images for `lenet-mnist`'s own data; otherwise
    `DEFAULT_CALIBRATION`, `DEFAULT_MAX_LENGTH`, `DEFAULT_BATCH_SIZE`.
    """
    llm = loaded.kind == "causal-lm"
    named = data in BUILTIN_TEXTS
    path = Path(data) if data is not None and not named else None
    if path is not None and not path.exists():
        raise ModelError(f"--data {data} does not exist (or name a built-in text: {', '.join(BUILTIN_TEXTS)})")
    if batch_size is None:
        batch_size = LLM_BATCH_SIZE if llm else DEFAULT_BATCH_SIZE
    if path is not None and _is_samples(path):
        found = _sample_data(loaded, path, calibration=_given(calibration, DEFAULT_CALIBRATION), seed=seed,
                             batch_size=batch_size)  # fmt: skip
    elif loaded.kind == "image-classifier" and data is None:
        from .zoo import mnist_5k

        images, labels = mnist_5k()
        found = _split_samples(images, labels, "mnist_5k.csv.gz", "images", _given(calibration, MNIST_CALIBRATION),
                               seed, batch_size, 500)  # fmt: skip
    elif loaded.tokenizer is None:
        raise ModelError(
            f"{loaded.name} has no tokenizer, so it reads no text; give --data a tensor file"
            f" ({', '.join(user.TENSOR_SUFFIXES)}) or an image folder"
        )
    elif llm:
        window = max_length if max_length is not None else default_window(loaded)
        found = _window_data(loaded, data, window=window, calibration=calibration,
                             evaluation=_given(evaluation, LLM_EVALUATION), seed=seed,
                             batch_size=batch_size)  # fmt: skip
    else:
        calibration = _given(calibration, DEFAULT_CALIBRATION)
        max_length = _given(max_length, DEFAULT_MAX_LENGTH)
        docs, source = load_documents(data)
        calib_docs, eval_docs = split_documents(docs, calibration, seed=seed)
        found = Data(
            calib=text_batches(loaded.tokenizer, calib_docs, max_length=max_length, batch_size=batch_size),
            evals=text_batches(loaded.tokenizer, eval_docs, max_length=max_length, batch_size=batch_size),
            source=source,
            unit="documents",
            n_calib=len(calib_docs),
            n_eval=len(eval_docs),
            texts=eval_docs,
            seed=seed,
            max_length=max_length,
            batch_size=batch_size,
        )
    found.builtin = data is None or named
    _check_runs(loaded, found)
    return found


def _given(value: int | None, default: int) -> int:
    return default if value is None else value


def default_window(loaded: LoadedModel) -> int:
    """Tokens per window of a causal LM when --max-length is not given: `LLM_WINDOW`, or the
    model's `max_position_embeddings` when that is shorter."""
    limit = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None)
    return min(LLM_WINDOW, limit) if isinstance(limit, int) and limit >= 2 else LLM_WINDOW


def _window_data(
    loaded: LoadedModel,
    data: str | None,
    *,
    window: int,
    calibration: int | None,
    evaluation: int,
    seed: int,
    batch_size: int,
) -> Data:
    """A causal LM's text as windows of `window` tokens: `calibration` of them (None: the
    default for the text's length), and at most `evaluation` others held out."""
    if evaluation < 1:
        raise ModelError(f"evaluation {evaluation} holds out no window; hold out at least 1")
    if data == "mix":
        return _mix_data(loaded, window=window, calibration=calibration, evaluation=evaluation, seed=seed,
                         batch_size=batch_size)  # fmt: skip
    docs, source = load_documents(data)
    news = data in (None, "news")
    windows = token_windows(loaded.tokenizer, docs, window=window)
    if len(windows) < 2:
        raise ModelError(
            f"{source} holds {len(windows)} window(s) of {window} tokens; calibration and evaluation need at least 2:"
            " give more text or a shorter --max-length"
        )
    if calibration is None:
        calibration = default_calibration_windows(len(windows), evaluation)
    calib, held_out = split_windows(len(windows), calibration, evaluation, seed=seed)
    return Data(
        calib=window_batches(windows, calib, batch_size=batch_size),
        evals=window_batches(windows, held_out, batch_size=batch_size),
        # The built-in corpus is named with its windows; a --data path stays the path (a plan
        # records it to read the same file again).
        source=f"{source} ({window}-token windows)" if news else source,
        unit="windows",
        n_calib=len(calib),
        n_eval=len(held_out),
        seed=seed,
        max_length=window,
        batch_size=batch_size,
        corpus="news" if news else None,
    )


def _mix_data(loaded: LoadedModel, *, window: int, calibration: int | None, evaluation: int, seed: int,
              batch_size: int) -> Data:  # fmt: skip
    """The calibration mix (`mix`): each part's windows drawn in its share, part after part (so that
    evenly spaced scored windows spread over the parts); held out: news windows."""
    from .mix import mix_documents, mix_shares

    shares = mix_shares(LLM_CALIBRATION if calibration is None else calibration)
    chosen, held_out = [], None
    for k, (part, docs) in enumerate(mix_documents().items()):
        windows = token_windows(loaded.tokenizer, docs, window=window)
        if len(windows) <= shares[part]:
            raise ModelError(f"the mix's {part} text holds {len(windows)} windows of {window} tokens, fewer than the"
                             f" {shares[part]} it draws: use a smaller --calibration or --max-length")  # fmt: skip
        calib, rest = split_windows(len(windows), shares[part], evaluation if part == "news" else 0, seed=seed + k)
        chosen.append(windows[torch.tensor(calib, dtype=torch.long)])
        if part == "news":
            held_out = windows[torch.tensor(rest, dtype=torch.long)]
    assert held_out is not None
    calib_windows = torch.cat(chosen)
    parts = ", ".join(f"{part} {n}" for part, n in shares.items())
    return Data(
        calib=window_batches(calib_windows, list(range(len(calib_windows))), batch_size=batch_size),
        evals=window_batches(held_out, list(range(len(held_out))), batch_size=batch_size),
        source=f"the calibration mix ({parts}; {window}-token windows; held out: news)",
        unit="windows",
        n_calib=len(calib_windows),
        n_eval=len(held_out),
        seed=seed,
        max_length=window,
        batch_size=batch_size,
        corpus="mix",
    )


def other_domain_batches(
    loaded: LoadedModel, *, window: int, batch_size: int, windows: int = LLM_EVALUATION
) -> tuple[list, str]:
    """Evaluation text of another domain than every built-in calibration text, for a causal LM:
    the first `windows` windows of `window` tokens of gensim's Wikipedia articles
    (`text.wikipedia_documents`), never calibrated or tuned on; and what they are, in words."""
    from .text import wikipedia_documents

    ids = token_windows(loaded.tokenizer, wikipedia_documents(), window=window)[:windows]
    return window_batches(ids, list(range(len(ids))), batch_size=batch_size), f"{len(ids)} Wikipedia windows"


def _check_runs(loaded: LoadedModel, found: Data) -> None:
    """One forward pass on a calibration batch: data the model cannot read (wrong shape, wrong
    kind) is refused here, in one line, and a model of unknown output kind gets its task."""
    import torch

    try:
        if loaded.task is None:
            loaded.task = infer_task(loaded.model, found.calib[0])
        else:
            with torch.no_grad():
                loaded.task.forward(loaded.model, found.calib[0])
    except Exception as e:
        raise ModelError(f"{loaded.name} does not run on {found.source}: {type(e).__name__}: {e}") from e


def _is_samples(path: Path) -> bool:
    """A tensor file or an image folder (rather than text)."""
    if path.is_file():
        return path.suffix.lower() in user.TENSOR_SUFFIXES
    return path.is_dir() and any(d.is_dir() for d in path.iterdir()) and not any(path.glob("*.txt"))


def default_calibration_windows(n: int, evaluation: int = LLM_EVALUATION) -> int:
    """Calibration windows when none are asked for, out of `n`: `LLM_CALIBRATION`, fewer where
    the text would then hold out fewer than `evaluation`, but never fewer than 8 (or all but
    one window of a shorter text)."""
    return max(1, min(LLM_CALIBRATION, max(n - evaluation, min(8, n - 1))))


def _sample_data(loaded: LoadedModel, path: Path, *, calibration: int, seed: int, batch_size: int) -> Data:
    if path.is_dir():
        images, labels, _ = user.image_folder(path, channels=user.first_conv_channels(loaded.model))
        return _split_samples(images, labels, str(path), "images", calibration, seed, batch_size)
    inputs, labels = user.tensor_file(path)
    found = _split_samples(inputs, labels, str(path), "samples", calibration, seed, batch_size)
    if loaded.tokenizer is not None and not inputs.is_floating_point() and inputs.dim() == 2:
        # token ids for a text model: [n, tokens], every position real
        def as_text(batch: Any) -> dict:
            ids = batch[0] if isinstance(batch, tuple) else batch
            return {"input_ids": ids.long(), "attention_mask": torch.ones_like(ids, dtype=torch.long)}

        found.calib = [as_text(b) for b in found.calib]
        found.evals = [as_text(b) for b in found.evals]
    return found


def _order(n: int, calibration: int, seed: int) -> tuple[Tensor, Tensor]:
    if not 0 < calibration < n:
        raise ModelError(
            f"--calibration {calibration} does not fit {n} samples: use 1 to {n - 1} (the rest are held out)"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:calibration].sort().values, order[calibration:].sort().values


def _batches(inputs: Tensor, labels: Tensor | None, idx: Tensor, size: int) -> list:
    chunks = [idx[i : i + size] for i in range(0, len(idx), size)]
    if labels is None:
        return [inputs[c] for c in chunks]
    return [(inputs[c], labels[c]) for c in chunks]


def _split_samples(
    inputs: Tensor,
    labels: Tensor | None,
    source: str,
    unit: str,
    calibration: int,
    seed: int,
    batch_size: int,
    eval_batch_size: int | None = None,
) -> Data:
    picked, rest = _order(len(inputs), calibration, seed)
    return Data(
        calib=_batches(inputs, labels, picked, batch_size),
        evals=_batches(inputs, labels, rest, eval_batch_size or batch_size),
        source=source,
        unit=unit,
        n_calib=len(picked),
        n_eval=len(rest),
        seed=seed,
        batch_size=batch_size,
    )
