"""What a model's output is, and how its quality loss is measured and estimated.

A `Task` turns a calibration batch into the model's output tensor (`forward`), draws the
output-gradient of a pseudo-label loss for the empirical Fisher (`pseudo_gradient`), and
measures the divergence of a quantized model's output from the FP one (`divergence`). Both
are per sample and in the same units, so estimated and measured losses compare directly.

- `EmbeddingTask`: pooled (and by default L2-normalised) sentence embeddings. Pseudo-labels
  are Gaussian around the output, whose Fisher is the identity; we draw Rademacher vectors,
  which have the same second moment and lower variance. Loss `½‖Δe‖²` (= 1 − cos when unit norm).
- `LogitsTask`: class or token logits. The pseudo-label gradient is a random-sign sketch whose
  second moment is the softmax's Fisher (that of a label drawn from the model's own softmax);
  loss is KL(p_fp ‖ p_q) summed over the positions of a sample.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DRAW_ROWS",
    "EXACT_CLASSES",
    "EmbeddingTask",
    "LogitsTask",
    "OutputKind",
    "Task",
    "call_model",
    "infer_task",
    "positions_per_chunk",
]

OutputKind = Literal["embedding", "logits"]

# Classifiers with at most this many classes get the exact Fisher: one backward pass per class.
EXACT_CLASSES = 16
DRAW_ROWS = 64  # output positions per chunk of a pseudo-gradient sketch (its signs are drawn per chunk)
_CHUNK_ELEMENTS = 1 << 23  # logits per chunk of a divergence or a perplexity (32 MB in float32)


def positions_per_chunk(classes: int) -> int:
    """Positions whose logits over `classes` make one chunk of at most `_CHUNK_ELEMENTS`."""
    return max(1, _CHUNK_ELEMENTS // classes)


def call_model(model: nn.Module, batch: Any) -> Any:
    """Run `model` on a batch: a mapping is passed as keyword arguments (without `labels`), a
    tuple or list as `(inputs, labels...)`, anything else as the single input."""
    if isinstance(batch, Mapping):
        return model(**{k: v for k, v in batch.items() if k != "labels"})
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def _attention_mask(batch: Any) -> Tensor | None:
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, Tensor):
            return mask
    return None


class Task(ABC):
    """How to get an output from a batch, and how to score a change of that output."""

    output: OutputKind
    loss_units: str

    @abstractmethod
    def forward(self, model: nn.Module, batch: Any) -> Tensor:
        """The output tensor, batch-first (`[n, ...]`)."""

    @abstractmethod
    def pseudo_gradient(self, out: Tensor, batch: Any, generator: torch.Generator, draw: int | None = None) -> Tensor:
        """d(pseudo-label loss)/d(out) for one draw of pseudo-labels; same shape as `out`. The
        mean of its outer product over draws estimates the Fisher of the output; over the
        `exact_draws(out)` draws `draw = 0, 1, ...` (when not None), it is that Fisher."""

    def exact_draws(self, out: Tensor) -> int | None:
        """Draws whose pseudo-gradients give the output's Fisher exactly (None: it is sampled)."""
        return None

    @abstractmethod
    def divergence(self, ref: Tensor, out: Tensor, batch: Any) -> Tensor:
        """Per-sample divergence `[n]` of `out` from the reference output `ref`."""

    def mean_divergence(self, reference: nn.Module, model: nn.Module, batches: Iterable[Any]) -> float:
        """Mean per-sample divergence of `model`'s outputs from `reference`'s over `batches`, one
        batch at a time (no gradients; only one batch's outputs are held)."""
        total, n = 0.0, 0
        with torch.no_grad():
            for batch in batches:
                d = self.divergence(self.forward(reference, batch), self.forward(model, batch), batch)
                total += float(d.sum())
                n += d.shape[0]
        return total / max(n, 1)

    def describe(self) -> str:
        return type(self).__name__


class EmbeddingTask(Task):
    """Sentence (or any) embeddings: pooled hidden states, L2-normalised by default.

    Args:
        pooling: "mean" (masked mean over tokens), "cls" (first token) or "none" (the model's
            output is already the embedding).
        normalize: L2-normalise the embedding, as sentence-transformers' `Normalize` does.
    """

    output: OutputKind = "embedding"

    def __init__(self, pooling: Literal["mean", "cls", "none"] = "mean", normalize: bool = True) -> None:
        if pooling not in ("mean", "cls", "none"):
            raise ValueError(f"pooling must be mean, cls or none, got {pooling!r}")
        self.pooling = pooling
        self.normalize = normalize
        self.loss_units = "½‖Δe‖² per sample" + (" (= 1 − cosine to FP)" if normalize else "")

    def forward(self, model: nn.Module, batch: Any) -> Tensor:
        out = call_model(model, batch)
        hidden = out if isinstance(out, Tensor) else getattr(out, "last_hidden_state", None)
        if hidden is None:
            raise ValueError("EmbeddingTask needs a tensor output or one with .last_hidden_state")
        if self.pooling == "mean" and hidden.dim() == 3:
            mask = _attention_mask(batch)
            if mask is None:
                emb = hidden.mean(dim=1)
            else:
                m = mask.to(hidden.dtype).unsqueeze(-1)
                emb = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)
        elif self.pooling == "cls" and hidden.dim() == 3:
            emb = hidden[:, 0]
        else:
            emb = hidden.reshape(hidden.shape[0], -1)
        return F.normalize(emb, dim=-1) if self.normalize else emb

    def pseudo_gradient(self, out: Tensor, batch: Any, generator: torch.Generator, draw: int | None = None) -> Tensor:
        signs = torch.randint(0, 2, out.shape, generator=generator, device="cpu").to(out.device)
        return signs.to(out.dtype).mul_(2).sub_(1)

    def divergence(self, ref: Tensor, out: Tensor, batch: Any) -> Tensor:
        return 0.5 * (out.float() - ref.float()).pow(2).reshape(out.shape[0], -1).sum(dim=1)

    def describe(self) -> str:
        return f"embedding(pooling={self.pooling}, normalize={self.normalize})"


class LogitsTask(Task):
    """Class logits `[n, K]` or token logits `[n, T, K]` (padded positions masked).

    Args:
        causal: the logits predict the next token (a causal LM), so perplexity is defined.
    """

    output: OutputKind = "logits"
    loss_units = "KL(p_fp ‖ p_q) per sample, nats"

    def __init__(self, causal: bool = False) -> None:
        self.causal = causal

    def describe(self) -> str:
        return "LogitsTask(causal=True)" if self.causal else "LogitsTask"

    def forward(self, model: nn.Module, batch: Any) -> Tensor:
        out = call_model(model, batch)
        logits = out if isinstance(out, Tensor) else getattr(out, "logits", None)
        if logits is None:
            raise ValueError("LogitsTask needs a tensor output or one with .logits")
        return logits

    def _position_mask(self, logits: Tensor, batch: Any) -> Tensor | None:
        mask = _attention_mask(batch)
        if logits.dim() == 3 and mask is not None and mask.shape == logits.shape[:2]:
            return mask.to(logits.dtype)
        return None

    def exact_draws(self, out: Tensor) -> int | None:
        """One draw per class for class logits `[n, K]` with `K ≤ EXACT_CLASSES`."""
        return out.shape[-1] if out.dim() == 2 and out.shape[-1] <= EXACT_CLASSES else None

    def pseudo_gradient(self, out: Tensor, batch: Any, generator: torch.Generator, draw: int | None = None) -> Tensor:
        """With `draw = k` (class logits, `exact_draws`): `√(K p_k) (p − e_k)`, the gradient of
        label `k` weighted by its probability, so that the mean over the `K` classes is the
        softmax's Fisher `diag(p) − p pᵀ` exactly.

        Otherwise `v = Σ_k ε_k √p_k (e_k − p)` per position, `ε` random signs: `E[v vᵀ]` is that
        Fisher too, as for a label drawn from `p` (whose gradient is `p − e_y`). A drawn label is
        rarely one of the unlikely classes, yet those carry most of the Fisher of a confident
        prediction; the signed sum puts every class in every draw with its own weight, and the
        variance of its square is at most twice its mean squared (a drawn label's has no bound).
        """
        if draw is not None:
            p = out.detach().float().softmax(dim=-1)
            weight = (p[:, draw] * out.shape[-1]).sqrt().unsqueeze(1)
            p[:, draw] -= 1.0
            return p.mul_(weight).to(out.dtype)
        logits = out.detach().reshape(-1, out.shape[-1])
        v = torch.empty(logits.shape, dtype=torch.float32, device=out.device)
        for start in range(0, logits.shape[0], DRAW_ROWS):  # a few positions at a time: no second copy of the logits
            p = logits[start : start + DRAW_ROWS].float().softmax(dim=-1)
            signs = torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int8).mul_(2).sub_(1)
            part = p.sqrt().mul_(signs.to(p.device))
            v[start : start + DRAW_ROWS] = part.sub_(p.mul_(part.sum(dim=-1, keepdim=True)))
        v = v.reshape(out.shape)
        mask = self._position_mask(out, batch)
        if mask is not None:
            v.mul_(mask.unsqueeze(-1))
        return v.to(out.dtype)

    def divergence(self, ref: Tensor, out: Tensor, batch: Any) -> Tensor:
        """KL(p_ref ‖ p_out) per sample, over a few positions at a time: a 262k-token vocabulary's
        float32 log-softmax of a 512-token window is 0.5 GB, and three such copies were made."""
        flat_ref, flat = ref.reshape(-1, ref.shape[-1]), out.reshape(-1, out.shape[-1])
        rows = positions_per_chunk(ref.shape[-1])
        parts = []
        for start in range(0, flat_ref.shape[0], rows):
            logp_ref = flat_ref[start : start + rows].float().log_softmax(dim=-1)
            logp = flat[start : start + rows].float().log_softmax(dim=-1)
            parts.append((logp_ref.exp() * (logp_ref - logp)).sum(dim=-1))
        kl = torch.cat(parts).reshape(ref.shape[:-1])
        mask = self._position_mask(ref, batch)
        if mask is not None:
            kl = kl * mask
        return kl.reshape(kl.shape[0], -1).sum(dim=1)


def infer_task(model: nn.Module, batch: Any) -> Task:
    """Guess the task from one forward pass: `.logits` or a plain tensor → logits; an output
    with `.last_hidden_state` only (an encoder such as `BertModel`) → mean-pooled embedding."""
    with torch.no_grad():
        out = call_model(model, batch)
    if isinstance(out, Tensor) or getattr(out, "logits", None) is not None:
        return LogitsTask()
    if getattr(out, "last_hidden_state", None) is not None:
        return EmbeddingTask(pooling="mean", normalize=True)
    raise ValueError(
        f"cannot tell what the model's output ({type(out).__name__}) is; pass task=EmbeddingTask() or LogitsTask()"
    )
