"""A layer's running sums of first-order terms over samples and draws, and the estimate they give:
each option's score and standard error, pooled over rows with `shrunk_ratios`, fractional options
placed between their whole ones by the share of the gain their rows carry (see `fisher`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..quant.options import OptionLayout
from .base import LayerEstimate

__all__ = ["LayerSums", "shrunk_ratios"]

def _half_mean(total: Tensor, total_sq: Tensor, n: float) -> tuple[Tensor, Tensor]:
    """Half the mean of `n` samples given their sum and sum of squares, and its standard error."""
    mean, mean_sq = total / n, total_sq / n
    return 0.5 * mean, 0.5 * ((mean_sq - mean.square()).clamp_min(0) / n).sqrt()


def shrunk_ratios(loss: Tensor, stderr: Tensor, diag: Tensor) -> Tensor:
    """Per option, its ratio of whole score `loss` (standard error `stderr`) to row-diagonal
    score `diag`, shrunk towards the layer's ratio `Σ loss / Σ diag` by how noisy it is.

    In logs, each option's ratio is the layer's plus an offset of spread `τ²` (the options' own
    cross-row terms), seen through noise of variance `σ²_c = (stderr_c / loss_c)²`. `τ²` is
    the offsets' mean square less the mean noise; each offset is kept in the proportion
    `τ² / (τ² + σ²_c)` (empirical Bayes). A few samples give noise far above the spread and the
    layer's ratio (the whole sums were too noisy to rank options by: the winner's curse); many
    give the option's own ratio (LeNet-5, 512 images: one layer's options' ratios differed by 2x).
    """
    layer = float(loss.sum() / diag.sum()) if float(diag.sum()) > 0 else 1.0
    ratio = torch.full_like(diag, layer)
    scored = (diag > 0) & (loss > 0)
    if layer <= 0 or int(scored.sum()) < 2:
        return ratio
    offset = (loss[scored] / diag[scored]).log() - np.log(layer)
    noise = (stderr[scored] / loss[scored]).square()
    spread = max(0.0, float(offset.square().mean() - noise.mean()))
    ratio[scored] = layer * (offset * spread / (spread + noise)).exp()
    return ratio


@dataclass
class LayerSums:
    """Running sums of one weight's first-order terms over samples and draws.

    Fractional options need an order of rows. It is taken from the first `warmup` samples;
    the share of the base-to-next gain that the first `k` rows of that order carry is measured
    on the other samples, so the rows are not chosen for the noise of the samples that score
    them (the winner's curse). Whole-term options use every sample.
    """

    layout: OptionLayout
    n_rows: int
    warmup: int
    pool_rows: bool = True
    sum2: Tensor = field(init=False)
    sum4: Tensor = field(init=False)
    diag: Tensor = field(init=False)
    diag2: Tensor = field(init=False)
    marginal: Tensor = field(init=False)
    held: Tensor = field(init=False)
    count: int = 0
    _batch: tuple[int, Tensor, Tensor, int] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        k, p = len(self.layout.stack), len(self.layout.pairs)
        self.sum2 = torch.zeros(k, dtype=torch.float64)
        self.sum4 = torch.zeros(k, dtype=torch.float64)
        self.diag = torch.zeros(k, dtype=torch.float64)
        self.diag2 = torch.zeros(k, dtype=torch.float64)
        self.marginal = torch.zeros(p, self.n_rows, dtype=torch.float64)
        self.held = torch.zeros(p, self.n_rows, dtype=torch.float64)
        self._base = torch.tensor([pair.base for pair in self.layout.pairs], dtype=torch.long)
        self._next = torch.tensor([pair.next for pair in self.layout.pairs], dtype=torch.long)

    @property
    def fractional(self) -> bool:
        return bool(self.layout.pairs)

    def add(self, a: Tensor, per_row: Tensor | None, rows: Tensor, first_sample: int) -> None:
        """Add one draw's `a [n, K]` for calibration samples `first_sample ...`, and when
        fractional, `per_row [n, K, U]` for the global `rows [U]` it covers."""
        a2 = a.double().square()
        d = per_row.double().square().sum(dim=2) if self.pool_rows and per_row is not None else torch.zeros_like(a2)
        if self._batch is not None and self._batch[0] != first_sample:
            self._close_batch()
        if self._batch is None:
            self._batch = (first_sample, a2, d, 1)
        else:
            _, b2, bd, draws = self._batch
            self._batch = (first_sample, b2 + a2, bd + d, draws + 1)
        if not self.fractional:
            return
        assert per_row is not None
        # Each row's own share of the score, before minus after the extra term: the diagonal
        # of the score in rows (the signed cross terms are too noisy to rank or split by).
        gain = (per_row[:, self._base].square() - per_row[:, self._next].square()).double()  # [n, P, U]
        split = min(a.shape[0], max(0, self.warmup - first_sample))
        if split:
            self.marginal.index_add_(1, rows, -gain[:split].sum(dim=0))
        if split < a.shape[0]:
            self.held.index_add_(1, rows, gain[split:].sum(dim=0))

    def _close_batch(self) -> None:
        """Add the batch's samples, each with its terms averaged over its draws (so the standard
        error is that of a mean over samples, whether the draws are sampled or exact)."""
        if self._batch is None:
            return
        _, a2, d, draws = self._batch
        a2, d = a2 / draws, d / draws  # [n, K] per sample; d: its rows' own squared terms
        self.sum2 += a2.sum(dim=0)
        self.sum4 += a2.square().sum(dim=0)
        self.diag += d.sum(dim=0)
        self.diag2 += d.square().sum(dim=0)
        self.count += a2.shape[0]
        self._batch = None

    def _orders(self) -> list[Tensor]:
        """Per pair, its rows by warmup gain, largest first."""
        return [torch.from_numpy(np.argsort(m.numpy(), kind="stable")) for m in self.marginal]

    def _shares(self, orders: list[Tensor]) -> Tensor:
        """Per option, the share of its pair's base-to-next gain its extra rows carry (0 for
        whole options): the held-out diagonal gains of the first `k` rows of the pair's order
        over all rows', clipped to [0, 1]."""
        shares = torch.zeros(len(self.layout.whole), dtype=torch.float64)
        for j, (p, k) in enumerate(zip(self.layout.pair, self.layout.rows, strict=True)):
            if p < 0 or k == 0:
                continue
            ordered = self.held[p][orders[p]]
            total = float(ordered.sum())
            shares[j] = min(1.0, max(0.0, float(ordered[:k].sum()) / total)) if total > 0 else 0.0
        return shares

    def _pooled(self, loss: Tensor, stderr: Tensor, n: float) -> tuple[Tensor, Tensor]:
        """Each option's row-diagonal score times its `shrunk_ratios`, and its standard error
        (the ratio taken as exact)."""
        diag, diag_err = _half_mean(self.diag, self.diag2, n)
        ratio = shrunk_ratios(loss, stderr, diag)
        return diag * ratio, diag_err * ratio

    def finish(self) -> LayerEstimate:
        self._close_batch()
        layout = self.layout
        n = float(max(1, self.count))
        loss, stderr = _half_mean(self.sum2, self.sum4, n)
        if self.pool_rows:
            loss, stderr = self._pooled(loss, stderr, n)
        # A fractional option lies between its base and its next term, by the share of the gain
        # its rows carry. (Its own first-order sum over a few samples, squared, was too noisy to
        # choose by: on SmolLM2, seeds 0 and 1 gave 0.22 and 2.27 for a layer measured at 2.31.)
        orders = self._orders()
        shares = self._shares(orders)
        out_loss = torch.zeros(len(layout.whole), dtype=torch.float64)
        out_err = torch.zeros(len(layout.whole), dtype=torch.float64)
        for j, k in enumerate(layout.whole):
            if k >= 0:
                out_loss[j], out_err[j] = loss[k], stderr[k]
                continue
            pair = layout.pairs[layout.pair[j]]
            base, nxt, share = loss[pair.base], loss[pair.next], shares[j]
            out_loss[j] = base - share * (base - nxt).clamp_min(0)
            out_err[j] = (1 - share) * stderr[pair.base] + share * stderr[pair.next]
        labelled = {layout.pair_label(p): order.numpy() for p, order in enumerate(orders)}
        return LayerEstimate(loss=out_loss.numpy(), stderr=out_err.numpy(), orders=labelled)
