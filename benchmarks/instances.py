"""Synthetic allocation problems shaped like real ones, for the solver benchmark.

Each layer has a size (log-uniform, 10^4..10^6 weights), a sensitivity (log-normal, a few
orders of magnitude apart) and 18 options: 6 bit widths x 3 group sizes. Bytes follow the
packed format (codes + 4 bytes per group); BOPs are MACs x bits x 16. The loss is
`sensitivity x 4^-bits`, scaled per group size and perturbed by 0.7-1.4, so options are
dominated or off the convex hull as in measured profiles.
"""

from __future__ import annotations

import numpy as np

from profilers.quant.cost import layer_bops, layer_bytes
from profilers.types import ChoiceProfile, LayerProfile, LayerSpec, ProfileTable
from solvers import NO_LIMIT, Problem

BITS = (2, 3, 4, 5, 6, 8)
GROUPS = ((64, 1.0), (128, 1.35), (None, 2.2))  # group size, loss factor


def make_problem(n_layers: int, *, seed: int = 0, budgets: int = 1, ties: bool = False, fill: float = 0.55) -> Problem:
    """A problem with `budgets` resources (bytes, then BOPs) at `fill` of the way from the
    smallest to the largest plan."""
    rng = np.random.default_rng(seed)
    size = np.exp(rng.uniform(np.log(1e4), np.log(1e6), n_layers)).astype(np.int64)
    cols = rng.choice([384, 768, 1536, 4096], n_layers)
    sens = rng.lognormal(0.0, 2.0, n_layers)
    tokens = rng.integers(64, 512, n_layers)
    losses, costs = [], []
    for i in range(n_layers):
        loss, cost = [], []
        for g, factor in GROUPS:
            groups = size[i] // (g or cols[i]) + 1
            for b in BITS:
                loss.append(sens[i] * factor * 4.0 ** (-b) * rng.uniform(0.7, 1.4))
                row = [int(np.ceil(size[i] * b / 8) + 4 * groups)]
                if budgets > 1:
                    row.append(int(size[i] * tokens[i] * b * 16))
                cost.append(row)
        losses.append(np.array(loss))
        costs.append(np.array(cost, dtype=np.int64))
    low = np.sum([c.min(0) for c in costs], axis=0)
    high = np.sum([c.max(0) for c in costs], axis=0)
    limit = (low + fill * (high - low)).astype(np.int64)
    if budgets > 1:
        limit[1] = int(low[1] + (fill - 0.15) * (high[1] - low[1]))  # make the second budget bind too
    groups = []
    if ties:
        order = rng.permutation(n_layers)
        k = 0
        while k + 3 <= n_layers // 10 * 3:
            groups.append(tuple(int(x) for x in order[k : k + 3]))
            k += 3
    return Problem(losses=losses, costs=costs, budgets=limit, ties=groups)


def make_profile(n_layers: int, *, seed: int = 0) -> ProfileTable:
    """A `ProfileTable` of `n_layers` linear layers priced by the real cost model (bytes and BOPs
    of every whole-term choice of `allocator.choice_grid()`), with losses drawn as above."""
    from profilers.quant.options import choice_grid

    rng = np.random.default_rng(seed)
    choices = choice_grid()
    layers = []
    for i in range(n_layers):
        rows, cols = int(rng.choice([256, 384, 768, 1536])), int(rng.choice([384, 768, 1536]))
        spec = LayerSpec(name=f"blocks.{i // 6}.linear{i % 6}", kind="linear", shape=(rows, cols), rows=rows,
                         cols=cols, macs=rows * cols * 128, order=i)  # fmt: skip
        sens = rng.lognormal(0.0, 2.0)
        factor = {g: f for g, f in GROUPS}
        options = []
        for c in choices:
            loss = 0.0 if not c.quantized else sens * factor[c.group_size] * 4.0 ** (-c.bits * c.terms)
            options.append(ChoiceProfile(choice=c, bytes=layer_bytes(spec, c), bops=layer_bops(spec, c, 16),
                                         loss=loss * rng.uniform(0.7, 1.4)))  # fmt: skip
        layers.append(LayerProfile(spec=spec, options=tuple(options)))
    fp16 = sum(2 * x.spec.numel for x in layers)
    return ProfileTable(model_name=f"synthetic-{n_layers}", model_fingerprint=f"synthetic-{seed}",
                        data_fingerprint="synthetic", profiler="synthetic", loss_units="synthetic",
                        fixed_bytes=0, fp16_bytes=fp16, layers=tuple(layers))  # fmt: skip


__all__ = ["NO_LIMIT", "make_problem", "make_profile"]
