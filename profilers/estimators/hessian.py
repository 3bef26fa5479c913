"""Activation-aware layer error `tr(ΔW H ΔWᵀ)`, brought to loss units per output channel.

With `H = Σ_tokens x xᵀ` (the GPTQ Hessian, one forward pass) and `λ_o` the mean squared
output-gradient of output channel `o` under pseudo-labels (one backward pass), the estimate is

    s[l, c] = ½ / N · Σ_o λ_o (ΔW_c H ΔW_cᵀ)_oo

It is the empirical-Fisher score with two approximations: token cross terms are dropped
(gradients and inputs assumed independent across tokens, as in K-FAC), and so are cross
terms between output channels. What it keeps is the full input covariance of every row and a
per-channel loss weight, which is what makes different layers comparable. Cheaper than
`fisher` (no per-sample products), usually less accurate in ranking layers.

Rows separate, so fractional options are exact here: rows are ordered by
`λ_o (e_base,o − e_next,o)`, the error the extra term removes.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ..capture import conv_patches
from ..layers import QuantTarget
from ..quant.options import OptionLayout
from ..quant.rounding import error_stack
from ..types import Choice, ProfileError
from . import DEFAULT_DRAWS
from .base import CallCounter, Estimates, LayerEstimate, Profiler, ProfileRun, pseudo_label_passes

__all__ = ["HessianProfiler"]


class _ModuleStats:
    """Input second moments and output-gradient energy of one module's calls."""

    def __init__(self, module: nn.Module, n_rows: int) -> None:
        self.module = module
        self.h: Tensor | None = None  # [groups, c, c] (Linear/Conv) input second moments
        self.counts: Tensor | None = None  # [rows] lookups per embedding row
        self.grad_sq: Tensor | None = None  # per output channel (Linear/Conv) or dimension (Embedding)
        self.positions = 0  # output positions that contributed to grad_sq
        self.n_rows = n_rows

    def add_input(self, inp: Tensor) -> None:
        mod = self.module
        with torch.no_grad():
            if isinstance(mod, nn.Embedding):
                ids = inp.reshape(-1)
                if self.counts is None:
                    self.counts = torch.zeros(self.n_rows, dtype=torch.float64)
                self.counts.index_add_(0, ids, torch.ones(ids.numel(), dtype=torch.float64))
                return
            if isinstance(mod, nn.Conv2d):
                cols = conv_patches(mod, inp.detach().float())  # [n, groups * c, L]
                x = cols.reshape(cols.shape[0], mod.groups, -1, cols.shape[-1]).permute(1, 0, 3, 2)
                x = x.reshape(mod.groups, -1, x.shape[-1])  # [groups, n * L, c]
            else:
                x = inp.detach().float().reshape(1, -1, inp.shape[-1])
            h = torch.bmm(x.transpose(1, 2), x).double()
            self.h = h if self.h is None else self.h + h

    def add_grad(self, g: Tensor) -> None:
        g = g.detach().float()
        if isinstance(self.module, nn.Conv2d):  # [n, out, H, W]: channels on dim 1
            sq = g.square().sum(dim=(0, 2, 3))
            positions = g.numel() // g.shape[1]
        else:  # channels (or embedding dimensions) last
            sq = g.square().reshape(-1, g.shape[-1]).sum(dim=0)
            positions = g.numel() // g.shape[-1]
        sq = sq.double()
        self.grad_sq = sq if self.grad_sq is None else self.grad_sq + sq
        self.positions += positions

    @property
    def weight_of_channel(self) -> Tensor:
        """λ: mean squared output-gradient per output channel (or embedding dimension)."""
        assert self.grad_sq is not None
        return self.grad_sq / max(1, self.positions)

    def row_errors(
        self, weight: Tensor, stack: list[Choice], errors_of: Callable[[Tensor, list[Choice]], Tensor]
    ) -> tuple[Tensor, Tensor]:
        """`[K, rows]` λ-weighted errors `λ_o (ΔW H ΔWᵀ)_oo` per stack row (`errors_of` gives a
        layer's error stack), and the rows they cover."""
        lam = self.weight_of_channel.float()
        if isinstance(self.module, nn.Embedding):
            assert self.counts is not None
            rows = torch.nonzero(self.counts).squeeze(1)
            errors = error_stack(weight.detach()[rows], stack)  # [K, U, dim]; lookups have no H
            per_row = (errors.square() * lam).sum(dim=-1) * self.counts[rows].float()
            return per_row, rows
        assert self.h is not None
        errors = errors_of(weight, stack)  # [K, rows, cols]
        groups = self.h.shape[0]
        k, rows, cols = errors.shape
        e = errors.reshape(k, groups, rows // groups, cols)
        h = self.h.float()
        weighted = torch.einsum("kgoc,gcd->kgod", e, h)
        quad = (weighted * e).sum(dim=-1).reshape(k, rows)
        return quad * lam, torch.arange(rows)


class HessianProfiler(Profiler):
    """Activation-aware layer error in loss units (see the module docstring).

    Args:
        draws: pseudo-label draws for the per-channel loss weights.
        seed: seed of the draws.
    """

    name: ClassVar[str] = "hessian"

    def __init__(self, *, draws: int = DEFAULT_DRAWS["hessian"], seed: int = 0) -> None:
        if draws < 1:
            raise ProfileError(f"draws must be at least 1, got {draws}")
        self.draws = draws
        self.seed = seed

    def _estimate(self, run: ProfileRun) -> Estimates:
        stats = {id(m): _ModuleStats(m, t.spec.rows) for t in run.targets for m in t.modules}
        counter = CallCounter()
        for _, calls, _, draws in pseudo_label_passes(run, counter, draws=self.draws, seed=self.seed,
                                                      stage="statistics"):  # fmt: skip
            for call in calls:
                stats[id(call.module)].add_input(call.inp)
            for grads in draws:
                for call, g in zip(calls, grads, strict=True):
                    if g is not None:
                        stats[id(call.module)].add_grad(g)
        layers = {}
        for done, i in enumerate(sorted(counter.first_call)):
            run.report("scoring", done, len(counter.first_call))
            module_stats = [stats[id(m)] for m in run.targets[i].modules]
            layers[i] = self._layer(run.targets[i], run.layouts[i], module_stats, counter.samples,
                                    partial(run.quantizer.stack, i))  # fmt: skip
        run.report("scoring", len(counter.first_call), len(counter.first_call))
        return counter.estimates(layers, {"draws": self.draws, "seed": self.seed})

    @staticmethod
    def _layer(
        target: QuantTarget,
        layout: OptionLayout,
        module_stats: list[_ModuleStats],
        samples: int,
        errors_of: Callable[[Tensor, list[Choice]], Tensor],
    ) -> LayerEstimate:
        n_rows = target.spec.rows
        per_row = torch.zeros(len(layout.stack), n_rows, dtype=torch.float64)
        for st in module_stats:
            if st.grad_sq is None or (st.h is None and st.counts is None):
                continue  # a module whose output does not reach the loss adds nothing
            errs, rows = st.row_errors(target.weight, layout.stack, errors_of)
            per_row[:, rows] += errs.double()
        scale = 0.5 / max(1, samples)
        whole = per_row.sum(dim=1) * scale
        loss = np.zeros(len(layout.whole))
        orders = {}
        for j, k in enumerate(layout.whole):
            if k >= 0:
                loss[j] = float(whole[k])
        for p, pair in enumerate(layout.pairs):
            benefit = (per_row[pair.base] - per_row[pair.next]).numpy()
            order = np.argsort(-benefit, kind="stable")
            orders[layout.pair_label(p)] = order
            removed = np.concatenate([[0.0], np.cumsum(benefit[order])])
            for j, q in enumerate(layout.pair):
                if q == p:
                    loss[j] = float(whole[pair.base]) - scale * removed[layout.rows[j]]
        return LayerEstimate(loss=loss, stderr=np.zeros_like(loss), orders=orders)
