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

from typing import TYPE_CHECKING, ClassVar

import torch

from ..capture import batch_size
from ..types import ProfileError
from . import DEFAULT_DRAWS
from .base import Estimates, Profiler, ProfileRun
from .distributed import submit_block
from .fisher_sums import LayerSums, shrunk_ratios
from .memory import default_max_memory, format_size, memory_budget, release_freed_memory
from .scoring import SegmentScorer, Terms
from .segments import SegmentPasses
from .weight_grads import per_sample_weight_grads

if TYPE_CHECKING:
    from ..cluster import Cluster

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
        ray: score the blocks on a Ray cluster (`distributed`): `local`, `local:N` or an
            address `ray.init` takes; None scores everything in this process. The scores are
            the same either way.

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
        ray: str | None = None,
    ) -> None:
        if draws < 1:
            raise ProfileError(f"draws must be at least 1, got {draws}")
        self.draws = draws
        self.seed = seed
        self.warmup_samples = warmup_samples
        self.stream = stream
        self.max_memory = max_memory
        self.pool_rows = pool_rows
        self.ray = ray

    def _estimate(self, run: ProfileRun) -> Estimates:
        if self.ray is None:
            return self._estimate_on(run, None)
        from ..cluster import Cluster

        # Joined before any pass (an unreachable cluster fails at once); tasks compute on the driver's threads.
        cluster = Cluster(self.ray, run.report, "blocks scored", torch.get_num_threads())
        try:
            return self._estimate_on(run, cluster)
        finally:
            cluster.close()

    def _estimate_on(self, run: ProfileRun, cluster: Cluster | None) -> Estimates:
        """`_estimate`, with the block segments scored on `cluster` where given."""
        passes = SegmentPasses(run, draws=self.draws, seed=self.seed, stream=self.stream,
                               ship_blocks=cluster is not None)  # fmt: skip
        chunks = self._row_chunks(run, passes)
        total = sum(batch_size(b) or 1 for b in run.batches)
        warmup = max(1, min(self.warmup_samples, total // 2))
        states = [LayerSums(run.layouts[i], t.spec.rows, warmup, self.pool_rows) for i, t in enumerate(run.targets)]
        sums = {i: Terms(n) for i, n in passes.segments_of.items()}
        scorer = SegmentScorer(dict(enumerate(run.targets)), dict(enumerate(run.layouts)), run.quantizer.method,
                               run.batches, passes.first_sample, passes.segments_of, passes.hessians,
                               passes.extra_hessians, self.pool_rows)  # fmt: skip
        batches = None  # the batches in the cluster's object store, once a block goes there
        for s, segment in enumerate(passes):
            run.report("scoring", s, passes.total)
            if cluster is not None and segment.inputs is not None:
                if batches is None:
                    batches = (cluster.put(list(run.batches)), cluster.put(list(run.extra)))
                block = passes.chain.blocks[segment.block]  # type: ignore[index]
                submit_block(cluster, segment, block, scorer, chunks, states, batches, passes.draws)
            else:
                for i in segment.targets:
                    scorer.score(i, segment, chunks.get(i), states[i], sums[i])
            del segment
            release_freed_memory()
        run.report("scoring", passes.total, passes.total)
        if cluster is not None:
            for scored in cluster.gather():
                for i, state in scored.items():
                    states[i] = state
        layers = {i: states[i].finish() for i in passes.counter.first_call}
        settings = {"draws": passes.draws, "exact_fisher": passes.exact is not None, "seed": self.seed,
                    "blocks": passes.blocks, "pool_rows": self.pool_rows}
        return passes.counter.estimates(layers, settings)

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
