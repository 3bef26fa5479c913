"""Measured quality of quantized models against the FP model, and the plan-vs-uniform comparison.

Measured, not estimated: each variant is a copy of the FP model with the plan (or a uniform
setting) applied, run on held-out evaluation batches. Metrics:

- divergence: the task's per-sample divergence from FP (the unit the profile estimates),
- cosine: mean cosine similarity of embeddings to FP (embedding tasks),
- agreement: share of positions whose top-1 prediction matches FP (logit tasks),
- accuracy: share of samples whose top-1 class is the label (batches that carry labels),
- perplexity: exp of the mean next-token negative log-likelihood (causal language models),
- wordsim: Spearman correlation of embedding similarity with WordSim353 human scores.

Peers (`allocator.peers`) are measured the same way, on the same batches.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from profilers.specs import Choice
from profilers.tasks import Task

from .apply import apply_choices_, apply_plan_
from .plan import Plan, UniformPoint

if TYPE_CHECKING:
    from .peers import PeerVariant

__all__ = [
    "METRICS",
    "Comparison",
    "Measured",
    "compare",
    "default_metric",
    "default_uniform",
    "model_outputs",
    "wordsim_spearman",
]

# metric name -> (Measured attribute, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "cosine": ("cosine", True),
    "accuracy": ("accuracy", True),
    "agreement": ("agreement", True),
    "perplexity": ("perplexity", False),
    "wordsim": ("wordsim", True),
    "kl": ("divergence", False),
}


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

    def value(self, metric: str) -> float | None:
        """The value of a metric name of `METRICS` (None when not measured for this model)."""
        return getattr(self, METRICS[metric][0])


@dataclass
class Comparison:
    """FP model, the plan, uniform settings and peers, measured on the same evaluation data."""

    fp: Measured
    plan: Measured
    uniform: list[Measured] = field(default_factory=list)
    metric: str = "cosine"
    peers: list[Measured] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # peers not run, and why

    def best_uniform(self, *, fitting_only: bool = False) -> Measured | None:
        """Best measured uniform variant by the primary metric (only those within budget if asked)."""
        rows = [u for u in self.uniform if u.fits or not fitting_only]
        if not rows:
            return None
        return max(rows, key=self.score)

    def score(self, m: Measured) -> float:
        """Higher is better: the metric, negated when lower is better; -divergence when the
        metric was not measured for `m`."""
        value = m.value(self.metric)
        if value is None:
            return -m.divergence
        return value if METRICS[self.metric][1] else -value

    def best_peer(self) -> Measured | None:
        """The best measured peer by the primary metric."""
        return max(self.peers, key=self.score) if self.peers else None

    @property
    def rows(self) -> list[Measured]:
        return [self.fp, self.plan, *self.uniform, *self.peers]


def default_metric(task: Task, fp: Measured) -> str:
    """The metric a model kind is judged by: cosine for embeddings, perplexity for causal LMs,
    accuracy when the batches carry labels, else top-1 agreement with FP."""
    if task.output == "embedding":
        return "cosine"
    if fp.perplexity is not None:
        return "perplexity"
    return "accuracy" if fp.accuracy is not None else "agreement"


def model_outputs(model: nn.Module, batches: Sequence[Any], task: Task) -> list[Tensor]:
    """The task outputs of `model` on each batch (no gradients)."""
    model.eval()
    with torch.no_grad():
        return [task.forward(model, b).detach() for b in batches]


def _measure(
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
            perplexity = _perplexity(outs, batches)
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


def _perplexity(outs: Sequence[Tensor], batches: Sequence[Any]) -> float | None:
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


def compare(
    model: nn.Module,
    plan: Plan,
    batches: Sequence[Any],
    task: Task,
    *,
    uniform: Sequence[UniformPoint] | None = None,
    words: Callable[[nn.Module], float] | None = None,
    fp_bytes: int | None = None,
    progress: Callable[[str], None] | None = None,
    hessians: dict[str, Tensor] | None = None,
    peers: Sequence[PeerVariant] = (),
    skipped: Sequence[str] = (),
    metric: str | None = None,
) -> Comparison:
    """Measure FP, the plan, uniform settings and peers on `batches`.

    Args:
        model: the FP model (left unchanged; variants are deep copies).
        plan: the plan to measure.
        batches: held-out evaluation batches.
        task: output kind and divergence.
        uniform: uniform settings to measure; default: the three fitting settings with the
            least predicted loss, and the smallest setting at least as large as the plan.
        words: optional extra metric of a model (e.g. WordSim353 Spearman).
        fp_bytes: size of the FP reference to print (default: the fp32 parameter bytes).
        progress: optional callback receiving the label being measured.
        hessians: every layer's `H`, for a GPTQ plan; uniform settings are rounded the same way.
        peers: other quantizers' settings (`allocator.peers.peer_variants`), built one at a time.
        skipped: why peers that were asked for are missing, carried into the result.
        metric: a name of `METRICS` to rank by (default: `default_metric`).
    """
    note = progress or (lambda label: None)
    if metric is not None and metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: choose from {', '.join(METRICS)}")
    if fp_bytes is None:
        fp_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    note("FP")
    started = time.perf_counter()
    reference = model_outputs(model, batches, task)
    fp = _measure(
        "FP",
        reference,
        batches,
        task,
        reference,
        size=fp_bytes,
        bpw=None,
        predicted=0.0,
        wordsim=words(model) if words is not None else None,
        started=started,
    )

    def measure(label: str, m: nn.Module, made: float, **kw: Any) -> Measured:
        started = time.perf_counter()
        outs = model_outputs(m, batches, task)
        score = words(m) if words is not None else None
        return _measure(
            label, outs, batches, task, reference, wordsim=score, started=started, quantize_seconds=made, **kw
        )

    def variant(label: str, make: Callable[[], nn.Module], **kw: Any) -> Measured:
        note(label)
        t0 = time.perf_counter()
        m = make()
        return measure(label, m, time.perf_counter() - t0, **kw)

    plan_row = variant(
        "plan",
        lambda: apply_plan_(copy.deepcopy(model), plan, hessians=hessians),
        size=plan.predicted.bytes,
        bpw=plan.predicted.bpw,
        predicted=plan.predicted.loss,
        kind="plan",
    )
    rows = []
    for u in list(uniform) if uniform is not None else default_uniform(plan):
        make = lambda u=u: apply_choices_(  # noqa: E731
            copy.deepcopy(model), dict.fromkeys(plan.layers, u.choice), method=plan.method, hessians=hessians
        )
        label = f"uniform {u.choice.label}"
        rows.append(variant(label, make, size=u.bytes, bpw=u.bpw, predicted=u.loss, fits=u.fits, kind="uniform"))
    peer_rows = []
    for peer in peers:
        note(peer.label)
        built = peer.build()
        kw = {"size": built.bytes, "bpw": built.bpw, "predicted": None, "fits": built.fits, "kind": "peer"}
        peer_rows.append(measure(built.label, built.model, built.seconds, **kw))
        del built
    return Comparison(
        fp=fp,
        plan=plan_row,
        uniform=rows,
        metric=metric or default_metric(task, fp),
        peers=peer_rows,
        skipped=list(skipped),
    )


def default_uniform(plan: Plan, *, top: int = 3) -> list[UniformPoint]:
    """The `top` fitting uniform settings by predicted loss, plus the next size up from the
    plan. In lossless mode: the `top` smallest settings whose predicted loss meets the target,
    plus the one closest to the plan in size."""
    if plan.constraints.max_loss is not None:
        eps = plan.constraints.max_loss
        meeting = sorted((u for u in plan.uniform if u.fits and u.loss <= eps), key=lambda u: (u.bytes, u.loss))
        chosen = meeting[:top]
        if plan.uniform:
            near = min(plan.uniform, key=lambda u: abs(u.bytes - plan.predicted.bytes))
            if near not in chosen:
                chosen.append(near)
        return chosen
    fitting = [u for u in plan.uniform if u.fits][:top]
    larger = [u for u in plan.uniform if u.bytes >= plan.predicted.bytes and u.choice != Choice.fp16()]
    chosen = list(fitting)
    if larger:
        up = min(larger, key=lambda u: (u.bytes, u.loss))
        if up not in chosen:
            chosen.append(up)
    return chosen
