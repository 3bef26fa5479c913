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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from profilers.tasks import Task

from ..errors import AllocatorError
from . import METRICS

__all__ = [
    "METRICS",
    "Measured",
    "batch_labels",
    "check_metric",
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
    model.eval()
    with torch.no_grad():
        return [task.forward(model, b).detach() for b in batches]


def measure_outputs(
    label: str,
    outs: Sequence[Tensor],
    batches: Sequence[Any],
    task: Task,
    reference: Sequence[Tensor],
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
    div = torch.cat([task.divergence(r, o, b) for r, o, b in zip(reference, outs, batches, strict=True)])
    pairs = list(zip(reference, outs, strict=True))
    cosine = agreement = accuracy = perplexity = None
    if task.output == "embedding":
        cos = torch.cat([F.cosine_similarity(r.float().flatten(1), o.float().flatten(1), dim=1) for r, o in pairs])
        cosine = float(cos.mean())
    else:
        same = torch.cat([(r.argmax(-1) == o.argmax(-1)).float().flatten() for r, o in pairs])
        agreement = float(same.mean())
        labels = [batch_labels(b) for b in batches]
        if all(y is not None for y in labels):
            right = torch.cat([(o.argmax(-1) == y).float().flatten() for o, y in zip(outs, labels, strict=True)])
            accuracy = float(right.mean())
        if getattr(task, "causal", False):
            perplexity = perplexity_of(outs, batches)
    return Measured(
        label=label,
        bytes=size,
        bpw=bpw,
        predicted_loss=predicted,
        divergence=float(div.mean()),
        fits=fits,
        cosine=cosine,
        agreement=agreement,
        accuracy=accuracy,
        perplexity=perplexity,
        wordsim=wordsim,
        seconds=time.perf_counter() - started,
        quantize_seconds=quantize_seconds,
        kind=kind,
    )


def perplexity_of(outs: Sequence[Tensor], batches: Sequence[Any]) -> float | None:
    """exp(mean negative log-likelihood of each next token), over the real (unpadded) tokens."""
    nll = 0.0
    count = 0
    for logits, batch in zip(outs, batches, strict=True):
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        if ids is None or logits.dim() != 3:
            return None
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        logp = logits[:, :-1].float().log_softmax(-1)
        token = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        keep = (mask[:, 1:] * mask[:, :-1]).bool()
        nll -= float(token[keep].sum())
        count += int(keep.sum())
    return float(torch.tensor(nll / count).exp()) if count else None


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
