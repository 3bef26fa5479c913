"""Empirical-Fisher output score: the sensitivity of every (layer, option) from a few passes.

For a layer with weight `W`, output `Y` and a quantization error `ΔW` (option `c`), the
first-order change of a pseudo-label loss on sample `s` is

    a[s, c] = Σ g_Y ⊙ ΔY = ⟨ΔW_c, G_s⟩ = Σ_rows ⟨ΔW_c[o], G_s[o]⟩,   G_s = Σ_tokens g_Y xᵀ

where `g_Y` is the output-gradient for pseudo-labels drawn from the model's own output
distribution and `G_s` the per-sample weight gradient. Its second moment over draws is
`ΔYᵀ Jᵀ F J ΔY` (Gauss-Newton), the second-order loss increase, so the score

    s[l, c] = ½ mean_{samples, draws} a[s, c]²

estimates the expected divergence of the output when only layer `l` takes option `c`, in the
task's units (`Task.loss_units`). Cross terms between tokens, and between rows, are kept (sums
are taken before squaring): that is what makes the ranking of layers right.

Fractional options (`k` rows carry one more term): `a` is a sum over rows, so swapping the next
term in for a set of rows changes it by the sum of those rows' differences `δ[s, o]`; the
options' scores are exact for the nested row sets. Rows are ordered by how much of their own
share of the score the extra term removes, `Σ r_base,o² − r_next,o²` with `r_c,o = ⟨ΔW_c[o], G_s[o]⟩`,
measured on the first `warmup_samples` samples; the fractions are scored on the other samples,
so the rows are not chosen for the noise of the samples that score them.

Cost: one forward pass and `draws` backward passes to the layer outputs per batch (no
parameter gradients); every option is then scored from `G_s` by one product with the stack
of quantization errors. Modules sharing one weight add their `a` before squaring, so tied
weights are scored jointly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ..capture import Call, batch_size, conv_patches
from ..layers import QuantTarget
from ..quant.options import OptionLayout
from ..quant.rounding import error_stack
from ..types import Choice, ProfileError
from . import DEFAULT_DRAWS
from .base import CallCounter, Estimates, LayerEstimate, Profiler, ProfileRun, pseudo_label_passes

__all__ = ["FisherProfiler", "per_sample_weight_grads"]

# Per-sample weight gradients are built in chunks of at most this many elements.
_MAX_CHUNK_ELEMENTS = 1 << 25


def per_sample_weight_grads(call: Call, g: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
    """`G[s] = dL_s/dW` as `[n, rows, cols]` for samples `start:stop` of a Linear/Conv2d call."""
    mod = call.module
    g = g[start:stop].float()
    x = call.inp[start:stop].detach().float()
    n = g.shape[0]
    if isinstance(mod, nn.Conv2d):
        cols = conv_patches(mod, x)
        length = cols.shape[-1]
        if mod.groups == 1:
            return torch.bmm(g.reshape(n, mod.out_channels, length), cols.transpose(1, 2))
        gg = g.reshape(n, mod.groups, mod.out_channels // mod.groups, length)
        cc = cols.reshape(n, mod.groups, -1, length)
        return torch.einsum("ngol,ngil->ngoi", gg, cc).reshape(n, mod.out_channels, -1)
    x3 = x.reshape(n, -1, x.shape[-1])
    g3 = g.reshape(n, -1, g.shape[-1])
    return torch.bmm(g3.transpose(1, 2), x3)


def _products(grad_w: Tensor, stack: Tensor, n_paired: int) -> tuple[Tensor, Tensor | None]:
    """`a [b, K]` = `⟨ΔW_k, G_b⟩`, and per row `[b, n_paired, rows]` for the first `n_paired`
    stack rows (the ones fractional options mix), from per-sample gradients `grad_w [b, rows, cols]`."""
    b = grad_w.shape[0]
    if not n_paired:
        return grad_w.reshape(b, -1) @ stack.reshape(stack.shape[0], -1).T, None
    per_row = torch.einsum("boi,koi->bko", grad_w, stack[:n_paired])
    a = per_row.sum(dim=-1)
    if n_paired < stack.shape[0]:
        rest = grad_w.reshape(b, -1) @ stack[n_paired:].reshape(stack.shape[0] - n_paired, -1).T
        a = torch.cat([a, rest], dim=1)
    return a, per_row


def _dense_products(call: Call, g: Tensor, stack: Tensor, n_paired: int) -> tuple[Tensor, Tensor | None]:
    """`_products` for a Linear/Conv call with output-gradient `g`, in chunks of samples."""
    n = g.shape[0]
    chunk = max(1, _MAX_CHUNK_ELEMENTS // max(1, stack.shape[1] * stack.shape[2]))
    parts = [_products(per_sample_weight_grads(call, g, i, i + chunk), stack, n_paired) for i in range(0, n, chunk)]
    if len(parts) == 1:
        return parts[0]
    per_row = torch.cat([p[1] for p in parts]) if n_paired else None
    return torch.cat([p[0] for p in parts]), per_row


def _embedding_products(
    call: Call, g: Tensor, rows: Tensor, stack: Tensor, n_paired: int
) -> tuple[Tensor, Tensor | None]:
    """`_products` for an embedding lookup; `rows` are the sorted rows of `stack [K, U, dim]`."""
    n = g.shape[0]
    dim = g.shape[-1]
    local = torch.searchsorted(rows, call.inp.reshape(n, -1).contiguous())
    flat = (torch.arange(n, device=local.device).unsqueeze(1) * rows.numel() + local).reshape(-1)
    grad_rows = torch.zeros(n * rows.numel(), dim, dtype=torch.float32, device=g.device)
    grad_rows.index_add_(0, flat, g.float().reshape(-1, dim))
    return _products(grad_rows.reshape(n, rows.numel(), dim), stack, n_paired)


class _RowErrors:
    """Quantization errors of an embedding's rows, computed once per row as batches look them up."""

    def __init__(self, weight: Tensor, stack: list[Choice]) -> None:
        self.weight = weight
        self.stack = stack
        self.slot = torch.full((weight.shape[0],), -1, dtype=torch.long)
        self.errors = torch.empty(len(stack), 0, weight.shape[1])

    def get(self, rows: Tensor) -> Tensor:
        """`[K, len(rows), dim]` errors of the sorted `rows`."""
        missing = rows[self.slot[rows] < 0]
        if missing.numel():
            self.slot[missing] = torch.arange(missing.numel()) + self.errors.shape[1]
            new = error_stack(self.weight.detach()[missing], self.stack)
            self.errors = torch.cat([self.errors, new], dim=1)
        return self.errors[:, self.slot[rows]]


@dataclass
class _LayerState:
    """Running sums of one weight's first-order terms over samples and draws.

    Fractional options need an order of rows. It is taken from the first `warmup` samples
    and those samples do not score the fractions: rows chosen and scored on the same noisy
    estimates would look better than they are (the winner's curse), so fractions are scored
    on the remaining samples only. Whole-term options use every sample.
    """

    layout: OptionLayout
    n_rows: int
    warmup: int
    sum2: Tensor = field(init=False)
    sum4: Tensor = field(init=False)
    frac2: Tensor = field(init=False)
    frac4: Tensor = field(init=False)
    marginal: Tensor = field(init=False)
    count: int = 0
    frac_count: int = 0
    rank: Tensor | None = None
    orders: list[Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        k, n_opt, p = len(self.layout.stack), len(self.layout.whole), len(self.layout.pairs)
        self.sum2 = torch.zeros(k, dtype=torch.float64)
        self.sum4 = torch.zeros(k, dtype=torch.float64)
        self.frac2 = torch.zeros(n_opt, dtype=torch.float64)
        self.frac4 = torch.zeros(n_opt, dtype=torch.float64)
        self.marginal = torch.zeros(p, self.n_rows, dtype=torch.float64)
        base = [pair.base for pair in self.layout.pairs]
        nxt = [pair.next for pair in self.layout.pairs]
        self._base = torch.tensor(base, dtype=torch.long)
        self._next = torch.tensor(nxt, dtype=torch.long)
        # Per pair, its fractional options (padded with -1) and their extra-row counts.
        per_pair = [[j for j, q in enumerate(self.layout.pair) if q == p] for p in range(p)]
        width = max((len(o) for o in per_pair), default=0)
        self._opts = torch.full((p, width), -1, dtype=torch.long)
        self._ks = torch.zeros((p, width), dtype=torch.long)
        for q, opts in enumerate(per_pair):
            self._opts[q, : len(opts)] = torch.tensor(opts, dtype=torch.long)
            self._ks[q, : len(opts)] = torch.tensor([self.layout.rows[j] for j in opts], dtype=torch.long)

    @property
    def fractional(self) -> bool:
        return bool(self.layout.pairs)

    def add(self, a: Tensor, per_row: Tensor | None, rows: Tensor, first_sample: int) -> None:
        """Add one draw's `a [n, K]` for calibration samples `first_sample ...`, and when
        fractional, `per_row [n, K, U]` for the global `rows [U]` it covers."""
        a2 = a.double().square()
        self.sum2 += a2.sum(dim=0)
        self.sum4 += a2.square().sum(dim=0)
        self.count += a.shape[0]
        if not self.fractional:
            return
        assert per_row is not None
        split = min(a.shape[0], max(0, self.warmup - first_sample))
        if split:
            # Each row's own share of the score, before minus after the extra term: the
            # diagonal of the score in rows (the signed cross terms are too noisy to rank by).
            head = per_row[:split]  # per-row products of the paired stack rows
            gain = (head[:, self._base].square() - head[:, self._next].square()).sum(dim=0).double()
            self.marginal.index_add_(1, rows, -gain)
        if split < a.shape[0]:
            if self.rank is None:
                self._fix_order()
            tail = per_row[split:]
            self._add_fractions(a[split:, self._base], tail[:, self._next] - tail[:, self._base], rows)

    def _fix_order(self) -> None:
        rank = torch.empty_like(self.marginal, dtype=torch.long)
        for p in range(self.marginal.shape[0]):
            order = torch.from_numpy(np.argsort(self.marginal[p].numpy(), kind="stable"))
            self.orders.append(order)
            rank[p, order] = torch.arange(self.n_rows)
        self.rank = rank

    def _add_fractions(self, a_base: Tensor, delta: Tensor, rows: Tensor) -> None:
        """Score every fractional option on these samples: its `a` is `a_base` plus the
        differences of the rows in its set (the first `k` of the pair's order)."""
        assert self.rank is not None
        m, n_pairs, n_rows = delta.shape
        pos = self.rank[:, rows]  # [P, U] position of each row in its pair's order
        pos_sorted, idx = torch.sort(pos, dim=1)
        cums = delta.gather(2, idx.unsqueeze(0).expand(m, n_pairs, n_rows)).cumsum(dim=-1)  # [m, P, U]
        counts = torch.searchsorted(pos_sorted, self._ks)  # [P, W] rows of this batch in each set
        picked = cums.gather(2, (counts - 1).clamp_min(0).unsqueeze(0).expand(m, -1, -1)) * (counts > 0)
        values = (a_base.unsqueeze(-1) + picked).double().square()  # [m, P, W]
        valid = self._opts >= 0
        opts = self._opts[valid]
        self.frac2.index_add_(0, opts, values.sum(dim=0)[valid])
        self.frac4.index_add_(0, opts, values.square().sum(dim=0)[valid])
        self.frac_count += m

    def finish(self) -> LayerEstimate:
        if self.fractional and self.rank is None:
            self._fix_order()
        layout = self.layout
        is_whole = torch.tensor([k >= 0 for k in layout.whole])
        whole = torch.tensor([max(0, k) for k in layout.whole])
        n = torch.where(is_whole, float(max(1, self.count)), float(max(1, self.frac_count))).double()
        mean2 = torch.where(is_whole, self.sum2[whole], self.frac2) / n
        mean4 = torch.where(is_whole, self.sum4[whole], self.frac4) / n
        var = (mean4 - mean2.square()).clamp_min(0)
        orders = {}
        if self.fractional:
            orders = {layout.pair_label(p): self.orders[p].numpy() for p in range(len(layout.pairs))}
        return LayerEstimate(loss=(0.5 * mean2).numpy(), stderr=(0.5 * (var / n).sqrt()).numpy(), orders=orders)


class FisherProfiler(Profiler):
    """Empirical-Fisher output score (see the module docstring).

    Args:
        draws: pseudo-label draws (backward passes) per batch; more draws, less noise.
        seed: seed of the pseudo-label draws.
        warmup_samples: calibration samples (at most half of them) whose per-row statistics
            order the rows for fractional options; fractions are scored on the others.

    Example:
        >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> data = [torch.randn(8, 16) for _ in range(2)]
        >>> table = FisherProfiler().profile(model, data, choices=[Choice(bits=4, group_size=16)])
        >>> [layer.spec.name for layer in table.layers]
        ['0', '2']
    """

    name: ClassVar[str] = "fisher"

    def __init__(self, *, draws: int = DEFAULT_DRAWS["fisher"], seed: int = 0, warmup_samples: int = 16) -> None:
        if draws < 1:
            raise ProfileError(f"draws must be at least 1, got {draws}")
        self.draws = draws
        self.seed = seed
        self.warmup_samples = warmup_samples

    def _estimate(self, run: ProfileRun) -> Estimates:
        targets, layouts = run.targets, run.layouts
        stacks: dict[int, Tensor] = {}
        row_errors: dict[int, _RowErrors] = {}
        for i, t in enumerate(targets):
            run.report("quantizing", i, len(targets))
            if all(isinstance(m, nn.Embedding) for m in t.modules):  # lookups only: rows on demand
                row_errors[i] = _RowErrors(t.weight, layouts[i].stack)
            else:
                stacks[i] = run.quantizer.stack(i, t.weight, layouts[i].stack)
        run.report("quantizing", len(targets), len(targets))

        total = sum(batch_size(b) or 1 for b in run.batches)
        warmup = max(1, min(self.warmup_samples, total // 2))
        states = [_LayerState(layouts[i], t.spec.rows, warmup) for i, t in enumerate(targets)]
        counter = CallCounter()
        for _, calls, first_sample, draws in pseudo_label_passes(run, counter, draws=self.draws, seed=self.seed,
                                                                 stage="scoring"):  # fmt: skip
            lookups = self._lookup_stacks(row_errors, calls)
            for grads in draws:
                self._accumulate(targets, states, stacks, lookups, calls, grads, first_sample)
        layers = {i: states[i].finish() for i in counter.first_call}
        return counter.estimates(layers, {"draws": self.draws, "seed": self.seed})

    @staticmethod
    def _lookup_stacks(row_errors: dict[int, _RowErrors], calls: list[Call]) -> dict[int, tuple[Tensor, Tensor]]:
        """For each lookup-only embedding called in this batch: the sorted rows it looked up and
        their errors `[K, rows, dim]` (rows quantize independently of each other)."""
        ids: dict[int, list[Tensor]] = {}
        for call in calls:
            if call.target in row_errors:
                ids.setdefault(call.target, []).append(call.inp.reshape(-1))
        out = {}
        for i, parts in ids.items():
            rows = torch.unique(torch.cat(parts))
            out[i] = (rows, row_errors[i].get(rows))
        return out

    @staticmethod
    def _accumulate(
        targets: list[QuantTarget],
        states: list[_LayerState],
        stacks: dict[int, Tensor],
        lookups: dict[int, tuple[Tensor, Tensor]],
        calls: list[Call],
        grads: tuple[Tensor | None, ...],
        first_sample: int,
    ) -> None:
        """Add one batch's first-order terms for one draw (`grads`: its output-gradients per call)
        to each weight's running sums; the batch holds calibration samples `first_sample ...`."""
        totals: dict[int, tuple[Tensor, Tensor | None]] = {}
        for call, g in zip(calls, grads, strict=True):
            if g is None:
                continue
            i = call.target
            n_paired = states[i].layout.n_paired
            if i in lookups or isinstance(call.module, nn.Embedding):
                rows, stack = lookups[i] if i in lookups else (torch.arange(targets[i].spec.rows), stacks[i])
                a, per_row = _embedding_products(call, g, rows, stack, n_paired)
            else:
                a, per_row = _dense_products(call, g, stacks[i], n_paired)
            if i in totals:  # a weight used by several calls: first-order terms add up
                a0, p0 = totals[i]
                a, per_row = a0 + a, None if per_row is None else p0 + per_row
            totals[i] = (a, per_row)
        for i, (a, per_row) in totals.items():
            rows = lookups[i][0] if i in lookups else torch.arange(targets[i].spec.rows)
            states[i].add(a, per_row, rows, first_sample)
