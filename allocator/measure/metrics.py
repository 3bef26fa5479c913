"""Measured quality of one model variant against the FP outputs, on held-out batches.

- divergence: the task's per-sample divergence from FP (the unit the profile estimates),
- cosine: mean cosine similarity of embeddings to FP (embedding tasks),
- agreement: share of positions whose top-1 prediction matches FP (logit tasks),
- accuracy: share of samples whose top-1 class is the label (batches that carry labels),
- perplexity: exp of the mean next-token negative log-likelihood (causal language models),
- wordsim: Spearman correlation of embedding similarity with WordSim353 human scores.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from profilers.tasks import Task, positions_per_chunk

from ..errors import AllocatorError
from . import METRICS

__all__ = [
    "METRICS",
    "FpOutputs",
    "Measured",
    "batch_labels",
    "check_metric",
    "each_output",
    "measure_outputs",
    "metrics_for",
    "model_outputs",
    "perplexity_of",
    "wordsim_spearman",
]

@dataclass(frozen=True)
class Measured:
    """One measured variant of the model."""

    label: str
    bytes: int
    bpw: float | None
    predicted_loss: float | None
    divergence: float
    fits: bool = True
    cosine: float | None = None
    agreement: float | None = None
    accuracy: float | None = None  # against the labels, when the batches carry them
    perplexity: float | None = None  # causal language models
    wordsim: float | None = None
    seconds: float = 0.0  # measuring on the evaluation batches
    quantize_seconds: float = 0.0  # making the variant (applying the plan, running a peer)
    kind: str = "fp"  # fp, plan, uniform or peer
    elsewhere: Measured | None = None  # the same model measured on text of another domain, when asked

    def value(self, metric: str) -> float | None:
        """The value of a metric name of `METRICS` (None when not measured for this model)."""
        return getattr(self, METRICS[metric][0])


def metrics_for(task: Task, batches: Sequence[Any], *, words: bool = False) -> list[str]:
    """The metrics that can be measured for this kind of model on these batches."""
    names = ["kl"]
    if task.output == "embedding":
        return [*names, "cosine", *(["wordsim"] if words else [])]
    names.append("agreement")
    token_ids = all(isinstance(b, dict) and "input_ids" in b for b in batches)
    if getattr(task, "causal", False) and token_ids:
        names.append("perplexity")
    if batches and all(batch_labels(b) is not None for b in batches):
        names.append("accuracy")
    return names


def check_metric(metric: str | None, available: Sequence[str]) -> None:
    """Refuse a metric this model or data cannot give, naming the ones it can."""
    if metric is None or metric in available:
        return
    if metric not in METRICS:
        raise AllocatorError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    needs = {
        "perplexity": "a causal language model on token ids",
        "accuracy": "data with class labels",
        "cosine": "a model whose output is an embedding",
        "wordsim": "a sentence encoder with a tokenizer",
        "agreement": "a model whose output is logits",
    }[metric]
    raise AllocatorError(f"--metric {metric} needs {needs}; for this model choose from {', '.join(available)}")


def model_outputs(model: nn.Module, batches: Sequence[Any], task: Task) -> list[Tensor]:
    """The task outputs of `model` on each batch (no gradients)."""
    return list(each_output(model, batches, task))


def each_output(model: nn.Module, batches: Iterable[Any], task: Task) -> Iterator[Tensor]:
    """The task output of `model` on one batch after another (no gradients), so a measurement
    holds one batch's output at a time (a 262k-token vocabulary's logits are 0.5 GB per window)."""
    model.eval()
    for b in batches:
        with torch.no_grad():
            out = task.forward(model, b).detach()
        yield out


REFERENCE_BYTES = 4 * 10**9  # FP outputs kept in memory for a whole evaluation, at most


class FpOutputs:
    """The FP model's outputs on `batches`, kept in memory when they fit in `keep_bytes`, else
    computed again batch by batch each time they are read (a 262k-token vocabulary's logits of
    32 windows of 512 tokens are 17 GB; recomputing costs one FP pass per measured variant)."""

    def __init__(self, model: nn.Module, batches: Sequence[Any], task: Task, keep_bytes: int = REFERENCE_BYTES):
        self.model, self.batches, self.task = model, batches, task
        outputs = each_output(model, batches, task)
        first = next(outputs, None)
        size = 0 if first is None else first.numel() * first.element_size() * len(batches)
        self.kept = [first, *outputs] if first is not None and size <= keep_bytes else None

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.kept) if self.kept is not None else each_output(self.model, self.batches, self.task)


def measure_outputs(
    label: str,
    outs: Iterable[Tensor],
    batches: Sequence[Any],
    task: Task,
    reference: Iterable[Tensor],
    *,
    size: int,
    bpw: float | None,
    predicted: float | None,
    wordsim: float | None,
    started: float,
    fits: bool = True,
    kind: str = "fp",
    quantize_seconds: float = 0.0,
) -> Measured:
    """A variant's row from its outputs on `batches` against the FP `reference`; `outs` is read
    one batch at a time (a list or `each_output`)."""
    div, cos, same, right, nll = [], [], [], [], _Nll()
    labels = [batch_labels(b) for b in batches]
    for out, ref, batch, y in zip(outs, reference, batches, labels, strict=True):
        div.append(task.divergence(ref, out, batch))
        if task.output == "embedding":
            cos.append(F.cosine_similarity(ref.float().flatten(1), out.float().flatten(1), dim=1))
            continue
        same.append((ref.argmax(-1) == out.argmax(-1)).float().flatten())
        if y is not None:
            right.append((out.argmax(-1) == y).float().flatten())
        if getattr(task, "causal", False):
            nll.add(out, batch)
    causal_lm = task.output != "embedding" and getattr(task, "causal", False)
    return Measured(
        label=label,
        bytes=size,
        bpw=bpw,
        predicted_loss=predicted,
        divergence=float(torch.cat(div).mean()),
        fits=fits,
        cosine=float(torch.cat(cos).mean()) if cos else None,
        agreement=float(torch.cat(same).mean()) if same else None,
        accuracy=float(torch.cat(right).mean()) if right and len(right) == len(labels) else None,
        perplexity=nll.perplexity() if causal_lm else None,
        wordsim=wordsim,
        seconds=time.perf_counter() - started,
        quantize_seconds=quantize_seconds,
        kind=kind,
    )


class _Nll:
    """The negative log-likelihood of each next real (unpadded) token, summed batch by batch."""

    def __init__(self) -> None:
        self.total, self.count, self.defined = 0.0, 0, True

    def add(self, logits: Tensor, batch: Any) -> None:
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        if ids is None or logits.dim() != 3:
            self.defined = False
            return
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        keep = (mask[:, 1:] * mask[:, :-1]).bool()
        rows = positions_per_chunk(logits.shape[-1])  # a few positions at a time, as the divergence
        for start in range(0, ids.shape[1] - 1, rows):
            stop = min(start + rows, ids.shape[1] - 1)
            logp = logits[:, start:stop].float().log_softmax(-1)
            token = logp.gather(-1, ids[:, start + 1 : stop + 1].unsqueeze(-1)).squeeze(-1)
            part = keep[:, start:stop]
            self.total -= float(token[part].sum())
            self.count += int(part.sum())

    def perplexity(self) -> float | None:
        return float(torch.tensor(self.total / self.count).exp()) if self.defined and self.count else None


def perplexity_of(outs: Iterable[Tensor], batches: Sequence[Any]) -> float | None:
    """exp(mean negative log-likelihood of each next token), over the real (unpadded) tokens."""
    nll = _Nll()
    for logits, batch in zip(outs, batches, strict=True):
        nll.add(logits, batch)
    return nll.perplexity()


def batch_labels(batch: Any) -> Tensor | None:
    """Class labels a batch carries: `(inputs, labels)` with integer labels, or a mapping with
    `labels` of one per sample; None otherwise (token-level labels are not class labels)."""
    y = batch.get("labels") if isinstance(batch, dict) else batch[1] if isinstance(batch, (tuple, list)) else None
    if isinstance(y, Tensor) and y.dim() == 1 and not y.is_floating_point():
        return y
    return None


def wordsim_spearman(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    pairs: Sequence[tuple[str, str, float]],
    *,
    batch_size: int = 64,
) -> float:
    """Spearman correlation between embedding cosine of word pairs and human similarity."""
    from scipy.stats import spearmanr

    vocab = sorted({w for a, b, _ in pairs for w in (a, b)})
    embs = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(vocab), batch_size):
            enc = dict(tokenizer(vocab[i : i + batch_size], padding=True, return_tensors="pt"))
            embs.append(task.forward(model, enc).float())
    table = dict(zip(vocab, torch.cat(embs), strict=True))
    sims = [float(F.cosine_similarity(table[a], table[b], dim=0)) for a, b, _ in pairs]
    return float(spearmanr(sims, [s for *_, s in pairs]).statistic)
