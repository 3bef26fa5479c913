"""Profiler benchmark on the default model (all-MiniLM-L6-v2, 64 calibration documents).

Prints, from one run:
1. time of each estimator relative to one forward+backward pass over the calibration set;
2. rank correlation (Spearman) of `fisher` (1, 2, 4 draws) and `hessian` with `measured`
   over all layers x whole-term choices;
3. additivity (Pearson of summed estimate vs measured plan divergence, 20 solver-like plans);
4. fractional options vs whole terms: measured cosine of the plan at the demo budget, and
   the widest budget step over which the optimal predicted loss stays flat ("staircase").

Usage: .venv/bin/python benchmarks/bench_profilers.py [--quick] [--measured-cache PATH]
`--quick` skips the measured profile (about 15 minutes on 2 cores) and what needs it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

import allocator
from allocator import sources
from allocator.measure.evaluate import compare
from allocator.measure.validation import validate_profile
from profilers.estimators import make_profiler
from profilers.types import ProfileTable


def forward_backward_seconds(model, batches, task) -> float:
    start = time.perf_counter()
    for b in batches:
        out = task.forward(model, b)
        (out * torch.randn_like(out)).sum().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def timed_profile(model, batches, task, profiler, **kw):
    start = time.perf_counter()
    draws = kw.pop("draws", None)
    table = make_profiler(profiler, draws=draws).profile(model, batches, task=task, **kw)
    return table, time.perf_counter() - start


def losses(table: ProfileTable) -> dict[tuple[str, str], float]:
    return {
        (layer.spec.name, o.choice.label): o.loss for layer in table.layers for o in layer.options if o.choice.quantized
    }


def staircase(table: ProfileTable, lo: float, hi: float, step: float = 2e3) -> tuple[float, int, float]:
    """Optimal predicted loss over budgets `lo..hi` in `step` bytes: the widest budget interval
    over which it stays flat (bytes), how many distinct values it takes, and the largest drop
    between neighbouring budgets (relative)."""
    budgets = np.arange(lo, hi, step)
    values = np.array([allocator.solve(table, budget=f"{int(b)}B", method="greedy").predicted.loss for b in budgets])
    changes = np.flatnonzero(values[1:] < values[:-1] * (1 - 1e-12)) + 1
    edges = np.concatenate([[0], changes, [len(budgets)]])
    widest = float(np.max(np.diff(edges)) * step)
    largest_drop = float(np.max(1 - values[1:] / values[:-1]))
    return widest, len(changes) + 1, largest_drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the measured profile")
    parser.add_argument("--measured-cache", default="out/measured-minilm.json", help="reuse/save the measured profile")
    args = parser.parse_args()

    loaded = sources.load_model("minilm")
    calib_docs, eval_docs = sources.split_documents(sources.lee_documents(), 64, seed=0)
    calib = sources.text_batches(loaded.tokenizer, calib_docs)
    evals = sources.text_batches(loaded.tokenizer, eval_docs)
    model, task = loaded.model, loaded.task
    grid = allocator.choice_grid()
    print(f"model: all-MiniLM-L6-v2, {len(calib_docs)} calibration documents x 128 tokens; {len(grid)} whole choices")

    fb = min(forward_backward_seconds(model, calib, task) for _ in range(2))
    print(f"\n1. time, relative to one forward+backward pass over the calibration set ({fb:.2f}s)")
    tables = {}
    for name, kw in [
        ("fisher, 1 draw", dict(profiler="fisher", draws=1, fractions=0)),
        ("fisher, 2 draws", dict(profiler="fisher", draws=2, fractions=0)),
        ("fisher, 4 draws", dict(profiler="fisher", draws=4, fractions=0)),
        ("fisher, 2 draws + 1/8 fractions", dict(profiler="fisher", draws=2, fractions=8)),
        ("fisher, 1 draw + 1/8 fractions", dict(profiler="fisher", draws=1, fractions=8)),
        ("hessian", dict(profiler="hessian", fractions=0)),
        ("hessian + 1/8 fractions", dict(profiler="hessian", fractions=8)),
    ]:
        table, seconds = timed_profile(model, calib, task, choices=grid, **kw)
        tables[name] = table
        n_opt = len(table.layers[0].options)
        print(f"   {name:34s} {n_opt:4d} options/layer  {seconds:6.1f}s  = {seconds / fb:4.2f}x forward+backward")

    if not args.quick:
        cache = Path(args.measured_cache)
        if cache.is_file():
            truth = ProfileTable.load(cache)
            print(f"\n   measured profile read from {cache}")
        else:
            truth, seconds = timed_profile(model, calib, task, choices=grid, profiler="measured", fractions=0)
            truth.save(cache)
            print(f"\n   measured profile: {seconds:.0f}s = {seconds / fb:.0f}x forward+backward (saved to {cache})")
        ref = losses(truth)
        keys = sorted(ref)
        print(f"\n2. Spearman with measured over {len(keys)} (layer, choice) pairs (all layers x quantized choices)")
        for name in ("fisher, 1 draw", "fisher, 2 draws", "fisher, 4 draws", "hessian"):
            est = losses(tables[name])
            rho = spearmanr([est[k] for k in keys], [ref[k] for k in keys]).statistic
            within = []
            for label in {k[1] for k in keys}:
                ks = [k for k in keys if k[1] == label]
                within.append(spearmanr([est[k] for k in ks], [ref[k] for k in ks]).statistic)
            print(f"   {name:16s} Spearman {rho:.4f}   ranking layers within a choice (mean) {np.mean(within):.4f}")

    print("\n3. additivity over 20 solver-like plans (Pearson of summed estimate vs measured; median ratio)")
    for name in ("fisher, 1 draw + 1/8 fractions", "fisher, 2 draws + 1/8 fractions", "hessian + 1/8 fractions"):
        v = validate_profile(model, calib, tables[name], task, pairs=64, plans=20)
        print(
            f"   {name:32s} Spearman {v.spearman:.4f} over {v.pairs} pairs; additivity Pearson"
            f" {v.additivity_pearson:.4f}, measured/estimated {v.additivity_ratio:.2f} ({v.seconds:.0f}s)"
        )

    print(f"\n4. plans at 12MB, measured on {len(eval_docs)} held-out documents")
    for name in (
        "fisher, 1 draw",
        "fisher, 1 draw + 1/8 fractions",
        "fisher, 2 draws",
        "fisher, 2 draws + 1/8 fractions",
    ):
        plan = allocator.solve(tables[name], budget="12MB")
        cmp = compare(model, plan, evals, task, uniform=[])
        print(
            f"   {name:32s} predicted 1-cos {plan.predicted.loss:.5f}  measured 1-cos {cmp.plan.divergence:.5f}"
            f"  cosine {cmp.plan.cosine:.4f}  {plan.predicted.bytes / 1e6:.3f} MB"
        )
    lo, hi = 9.5e6, 13.5e6
    print(f"\n   optimal predicted loss over budgets {lo / 1e6:.1f}-{hi / 1e6:.1f} MB in 2 kB steps:")
    for name in ("fisher, 2 draws", "fisher, 2 draws + 1/8 fractions"):
        widest, distinct, drop = staircase(tables[name], lo, hi)
        print(
            f"   {name:32s} widest flat stretch {widest / 1e3:.0f} kB, {distinct} distinct values,"
            f" largest drop between neighbouring budgets {100 * drop:.1f}%"
        )


if __name__ == "__main__":
    main()
