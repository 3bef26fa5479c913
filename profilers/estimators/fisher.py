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

With a few samples that square is noisy, option by option: one squared sum per sample and draw.
So (`pool_rows`, the default) each option is scored by its rows' own squared terms,
`d[l, c] = ½ mean_s Σ_o r[s, c, o]²` with `r[s, c, o] = ⟨ΔW_c[o], G_s[o]⟩` (an average over the
rows, far less noisy), times a ratio of whole to row-diagonal score that carries the cross-row
terms: the option's own `s[l, c] / d[l, c]`, shrunk towards the layer's `Σ_c s / Σ_c d` by how
noisy it is (`shrunk_ratios`). The solver picks the options whose scores came out lowest, so
per-option noise makes a plan look better than it is. On SmolLM2-135M (8 windows) the noise
dominates and the layer's ratio is taken; pooling took its 3.5 bits-per-weight plan from 34.4
to 33.4 perplexity. On LeNet-5 (512 images, exact Fisher) the options' own ratios are measured
well and differ up to 2x within a layer; the layer's ratio alone put the plan's predicted KL at
0.72-0.79x the measured one, the shrunk ratios at 0.95-1.02x over four calibration splits.

A sample's terms are averaged over its draws before the mean over samples, so a score's
standard error is that of a mean over samples. The draws are sketches of the output's Fisher
(`Task.pseudo_gradient`), or, for a classifier with few classes, one per class: the Fisher
exactly, with no noise from the draws.

Fractional options (`k` rows carry one more term): rows are ordered by how much of their own
share of the score the extra term removes, `gain_o = Σ r_base,o² − r_next,o²` with
`r_c,o = ⟨ΔW_c[o], G_s[o]⟩`, measured on the first `warmup_samples` samples. The option's score
lies between its two whole options, `s_base − share · (s_base − s_next)`, where `share` is the
part of the summed `gain_o` that its first `k` rows carry on the other samples (so the rows
are not chosen for the noise of the samples that score them). Scoring a fraction by its own
squared sum instead, as the whole options are, needs far more samples than a profile has: on
SmolLM2-135M with 8 windows it swung tenfold between seeds and the solver chose by the noise.

Cost: one forward pass and `draws` backward passes to the layer outputs per batch (no
parameter gradients); every option is then scored from `G_s` by one product with the stack
of quantization errors. Modules sharing one weight add their `a` before squaring, so tied
weights are scored jointly.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ..capture import batch_size
from ..input_hessians import call_hessian
from ..quant.options import needs_hessian
from ..quant.quantize import as_matrix
from ..types import ProfileError
from . import DEFAULT_DRAWS
from .base import Estimates, Profiler, ProfileRun
from .fisher_sums import LayerSums, shrunk_ratios
from .memory import default_max_memory, format_size, memory_budget, release_freed_memory
from .segments import Segment, SegmentPasses
from .weight_grads import RowErrors, dense_products, embedding_products, output_rows, per_sample_weight_grads

__all__ = ["FisherProfiler", "per_sample_weight_grads", "shrunk_ratios"]


class FisherProfiler(Profiler):
    """Empirical-Fisher output score (see the module docstring).

    Args:
        draws: pseudo-label draws (backward passes) per batch; more draws, less noise.
        seed: seed of the pseudo-label draws.
        warmup_samples: calibration samples (at most half of them) whose per-row statistics
            order the rows for fractional options; fractions are scored on the others.
        stream: score the model block by block (`segments`), holding one block's inputs,
            gradients and one layer's error stack at a time; False scores the whole model in
            one segment (the same scores, more memory).
        max_memory: bytes the profile may use, model included (`memory.memory_budget`):
            error stacks are built in row chunks that fit; a bound too small for one segment
            is refused before scoring, naming the smallest that works. None: 80% of this
            machine's memory.
        pool_rows: score each option by its rows' own squared terms, scaled by its ratio of
            whole to row-diagonal score shrunk towards the layer's by its noise
            (`shrunk_ratios`, module docstring); False scores each option by its own whole
            squared sum (noisier).

    Example:
        >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> data = [torch.randn(8, 16) for _ in range(2)]
        >>> table = FisherProfiler().profile(model, data, choices=[Choice(bits=4, group_size=16)])
        >>> [layer.spec.name for layer in table.layers]
        ['0', '2']
    """

    name: ClassVar[str] = "fisher"
    _hessians_up_front: ClassVar[bool] = False  # each segment's `H` comes from the inputs it holds

    def __init__(
        self, *, draws: int = DEFAULT_DRAWS["fisher"], seed: int = 0, warmup_samples: int = 16,
        stream: bool = True,
        max_memory: int | None = None,
        pool_rows: bool = True,
    ) -> None:
        if draws < 1:
            raise ProfileError(f"draws must be at least 1, got {draws}")
        self.draws = draws
        self.seed = seed
        self.warmup_samples = warmup_samples
        self.stream = stream
        self.max_memory = max_memory
        self.pool_rows = pool_rows

    def _estimate(self, run: ProfileRun) -> Estimates:
        passes = SegmentPasses(run, draws=self.draws, seed=self.seed, stream=self.stream)
        chunks = self._row_chunks(run, passes)
        total = sum(batch_size(b) or 1 for b in run.batches)
        warmup = max(1, min(self.warmup_samples, total // 2))
        states = [LayerSums(run.layouts[i], t.spec.rows, warmup, self.pool_rows) for i, t in enumerate(run.targets)]
        sums = {i: _Terms(n) for i, n in passes.segments_of.items()}
        for s, segment in enumerate(passes):
            run.report("scoring", s, passes.total)
            for i in segment.targets:
                self._score(run, i, segment, passes, chunks.get(i), states[i], sums[i])
            del segment
            release_freed_memory()
        run.report("scoring", passes.total, passes.total)
        layers = {i: states[i].finish() for i in passes.counter.first_call}
        settings = {"draws": passes.draws, "exact_fisher": passes.exact is not None, "seed": self.seed,
                    "blocks": passes.blocks, "pool_rows": self.pool_rows}
        return passes.counter.estimates(layers, settings)

    def _score(
        self,
        run: ProfileRun,
        i: int,
        segment: Segment,
        passes: SegmentPasses,
        step: int | None,
        state: LayerSums,
        sums: _Terms,
    ) -> None:
        """Add target `i`'s first-order terms from `segment` to its state: its error stack is
        built `step` rows at a time (all at once when None); a weight called in several
        segments has its terms summed until the last one."""
        t = run.targets[i]
        if passes.segments_of[i] == 1 and all(isinstance(m, nn.Embedding) for m in t.modules):
            errors = RowErrors(t.weight, run.layouts[i].stack)  # lookups only: rows on demand
            for b, _, a, per_row, rows in self._terms(run, i, segment, errors, slice(None)):
                state.add(a, per_row, rows, passes.first_sample[b])
            return
        hessian = self._hessian(run, i, segment, passes)
        n_rows = t.spec.rows
        step = step or n_rows
        memo: dict = {}  # what the chunks of rows share: H rotated and factorised once
        for r0 in range(0, n_rows, step):
            rows = slice(r0, min(r0 + step, n_rows))
            stack = self._stack(run, i, rows, hessian, memo)
            for b, d, a, per_row, _ in self._terms(run, i, segment, stack, rows):
                sums.add(b, d, r0, a, per_row)
            del stack
        if sums.segment_done():
            every = torch.arange(n_rows)
            for b, a, per_row in sums.terms():
                state.add(a, per_row, every, passes.first_sample[b])

    @staticmethod
    def _hessian(run: ProfileRun, i: int, segment: Segment, passes: SegmentPasses) -> Tensor | None:
        """GPTQ's `H` of target `i`: from its calls in `segment`, or from the whole forward pass
        for a weight called in several segments; plus that of the batches only `H` reads."""
        if not needs_hessian(run.quantizer.method):
            return None
        extra = passes.extra_hessian(i, segment)
        if passes.segments_of[i] > 1:
            return _sum(passes.hessians.get(i), extra)
        mine = [(b, s.call) for b, seen in enumerate(segment.seen) for s in seen if s.call.target == i]
        key = tuple((b, call.inp.data_ptr(), call.inp.shape) for b, call in mine)  # q, k, v share their inputs
        if key not in segment.hessians:
            hessian = None
            for b, call in mine:
                h = call_hessian(call, run.batches[b])
                if h is not None:
                    hessian = h if hessian is None else hessian + h
            segment.hessians = {key: hessian}
        return _sum(segment.hessians[key], extra)

    @staticmethod
    def _stack(run: ProfileRun, i: int, rows: slice, hessian: Tensor | None, memo: dict) -> Tensor:
        """The error stack of rows `rows` of target `i` (rows round independently, GPTQ too)."""
        weight = as_matrix(run.targets[i].weight.detach())[rows]
        if hessian is not None:
            run.quantizer.hessians[i] = hessian.float()
        try:
            return run.quantizer.stack(i, weight, run.layouts[i].stack, memo)
        finally:
            run.quantizer.hessians.pop(i, None)

    def _terms(self, run: ProfileRun, i: int, segment: Segment, stack: Tensor | RowErrors, rows: slice):
        """Per batch and draw, target `i`'s first-order terms `a [n, K]` (and per row, for
        fractions) over weight rows `rows`, summed over its calls in `segment`, with the rows
        they cover."""
        n_paired = len(run.layouts[i].stack) if self.pool_rows else run.layouts[i].n_paired
        for b, seen in enumerate(segment.seen):
            mine = [s for s in seen if s.call.target == i]
            if not mine:
                continue
            if isinstance(stack, RowErrors):
                covered = torch.unique(torch.cat([s.call.inp.reshape(-1) for s in mine]))
                errors = stack.get(covered)
            else:
                covered, errors = torch.arange(run.targets[i].spec.rows)[rows], stack
            for d in range(len(mine[0].grads)):
                a = per_row = None
                for s in mine:
                    g = s.grads[d]
                    if isinstance(s.call.module, nn.Embedding):
                        a1, p1 = embedding_products(s.call, g, covered, errors, n_paired)
                    else:
                        a1, p1 = dense_products(s.call, output_rows(s.call, g, rows), errors, n_paired)
                    a = a1 if a is None else a + a1
                    per_row = p1 if per_row is None or p1 is None else per_row + p1
                yield b, d, a, per_row, covered

    def _row_chunks(self, run: ProfileRun, passes: SegmentPasses) -> dict[int, int]:
        """Rows per error-stack chunk of each target so that the profile stays within
        `max_memory` (default: 80% of this machine's memory)."""
        bound = self.max_memory or default_max_memory()
        budget = memory_budget(run, passes)
        need, where = budget.smallest()
        if need > bound:
            shown = format_size(bound)
            what = f"--max-memory {shown}" if self.max_memory else f"this machine's memory ({shown} usable)"
            raise ProfileError(
                f"{what} is too small: profiling {where} needs at least {format_size(need)};"
                f" set --max-memory to {format_size(need)} or more, or calibrate on fewer or shorter samples"
            )
        return budget.chunks(bound)


def _sum(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


class _Terms:
    """A weight's first-order terms per (batch, draw), summed over the segments it is called in
    (a tied embedding and LM head) and joined over the row chunks its stack was built in."""

    def __init__(self, segments: int) -> None:
        self.left = segments
        self.sums: dict[tuple[int, int, int], tuple[Tensor, Tensor | None]] = {}

    def add(self, b: int, draw: int, r0: int, a: Tensor, per_row: Tensor | None) -> None:
        key = (b, draw, r0)
        if key in self.sums:
            a0, p0 = self.sums[key]
            a, per_row = a0 + a, None if per_row is None or p0 is None else p0 + per_row
        self.sums[key] = (a, per_row)

    def segment_done(self) -> bool:
        self.left -= 1
        return not self.left

    def terms(self):
        """Per (batch, draw) in order: the batch, `a` summed over chunks, per-row terms joined."""
        keys = sorted({(b, d) for b, d, _ in self.sums})
        for b, d in keys:
            parts = [self.sums[key] for key in sorted(k for k in self.sums if k[:2] == (b, d))]
            a = torch.stack([p[0] for p in parts]).sum(dim=0) if len(parts) > 1 else parts[0][0]
            rows = [p[1] for p in parts]
            per_row = None if any(r is None for r in rows) else torch.cat(rows, dim=-1)  # type: ignore[arg-type]
            yield b, a, per_row
        self.sums.clear()
