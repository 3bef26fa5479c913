"""Check a proxy profile against measurement: ranking and additivity.

- Ranking: on a random sample of (layer, option) pairs, the Spearman rank correlation between
  the profile's estimated loss and the measured single-layer divergence.
- Additivity: for whole-model plans of the kind a solver produces, the Pearson correlation
  between the summed estimates (what the solver optimises) and the measured divergence of
  the plan, and the median ratio measured / estimated. The plans are optimal plans at random
  budgets with a third of their layers moved to other options of similar size, so they
  spread around the plans users get rather than over options no solver would pick (where a
  second-order estimate is not meant to hold: a 2-bit per-channel layer can take the output
  to cosine 0.2).

Both are what a solver needs to trust: the first says the options are ordered right, the
second that summing per-layer losses predicts a plan's loss.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from profilers.estimators.base import ProgressFn
from profilers.estimators.measured import OutputMeter
from profilers.input_hessians import input_hessians
from profilers.layers import find_targets
from profilers.quant.options import needs_hessian
from profilers.quant.rounding import reconstruct
from profilers.tasks import Task
from profilers.types import ProfileError, ProfileTable, Validation

from ..planning.build import plan_from_profile

__all__ = ["REFERENCE_BYTES", "sample_plans", "validate_profile"]

REFERENCE_BYTES = 2 * 1024**3  # FP outputs the measurement keeps: batches beyond are left out


def sample_plans(
    table: ProfileTable, count: int, *, seed: int = 0, low_bpw: float = 3.0, high_bpw: float = 8.0, moved: float = 1 / 3
) -> list[list[int]]:
    """`count` plans (an option index per layer) around the solver's optimum at random budgets.

    Each plan solves the table at a budget drawn uniformly in `[low_bpw, high_bpw]` (clipped to
    what the table allows), then moves a `moved` share of its layers, at random, to a random
    quantized option whose size is within a factor 4/3 of the chosen one.
    """
    rng = np.random.default_rng(seed)
    smallest = sum(min(o.bytes for o in layer.options) for layer in table.layers)
    low = max(low_bpw, 8 * smallest / table.quantizable_params + 0.05)
    index = {layer.spec.name: {o.choice: j for j, o in enumerate(layer.options)} for layer in table.layers}
    plans = []
    for _ in range(count):
        bpw = rng.uniform(low, max(low, high_bpw))
        plan = plan_from_profile(table, [f"{bpw:.4f}bpw"], solver="greedy")
        chosen = [index[layer.spec.name][plan.layers[layer.spec.name].choice] for layer in table.layers]
        for i in rng.choice(len(chosen), size=round(moved * len(chosen)), replace=False):
            layer = table.layers[i]
            size = layer.options[chosen[i]].bytes
            near = [
                j for j, o in enumerate(layer.options) if o.choice.quantized and 0.75 * size <= o.bytes <= 4 / 3 * size
            ]
            if near:
                chosen[i] = int(rng.choice(near))
        plans.append(chosen)
    return plans


def validate_profile(
    model: nn.Module,
    batches: Sequence[Any],
    table: ProfileTable,
    task: Task,
    *,
    pairs: int = 64,
    plans: int = 20,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> Validation:
    """Measure `pairs` (layer, option) pairs and `plans` random plans; compare with `table`.

    Raises:
        ProfileError: the table does not match the model's layers.
    """
    from scipy.stats import pearsonr, spearmanr

    report = progress or (lambda stage, done, total: None)
    started = time.perf_counter()
    by_name = {t.spec.name: t for t in find_targets(model)}
    missing = [n for n in table.names if n not in by_name]
    if missing:
        raise ProfileError(
            f"the profile names layers the model lacks ({', '.join(missing[:3])}); it is for another model"
        )
    targets = [by_name[n] for n in table.names]
    measured_on = _fitting(model, list(batches), task)  # GPTQ's H below still reads every batch
    meter = OutputMeter(model, targets, measured_on, task)
    method = str(table.settings.get("method", "rtn"))
    hessians = input_hessians(model, batches, task, targets) if needs_hessian(method) else {}

    def quantized(i: int, j: int) -> torch.Tensor:
        layer = table.layers[i]
        choice = layer.options[j].choice
        rows = torch.as_tensor(layer.extra_rows(choice)) if choice.extra else None
        return reconstruct(targets[i].weight.detach(), choice, method=method, hessian=hessians.get(i), extra_rows=rows)

    rng = np.random.default_rng(seed)
    candidates = [
        (i, j) for i, layer in enumerate(table.layers) for j, o in enumerate(layer.options) if o.choice.quantized
    ]
    picked = [candidates[k] for k in rng.choice(len(candidates), size=min(pairs, len(candidates)), replace=False)]
    estimated, measured = [], []
    for k, (i, j) in enumerate(sorted(picked)):
        report("validating layers", k, len(picked))
        estimated.append(table.layers[i].options[j].loss)
        measured.append(meter.measure_layer(i, quantized(i, j))[0])
    report("validating layers", len(picked), len(picked))

    summed, plan_measured = [], []
    for k, plan in enumerate(sample_plans(table, plans, seed=seed)):
        report("validating plans", k, plans)
        summed.append(sum(layer.options[j].loss for layer, j in zip(table.layers, plan, strict=True)))
        plan_measured.append(meter.measure_plan({i: quantized(i, j) for i, j in enumerate(plan)})[0])
    report("validating plans", plans, plans)

    rho = float(spearmanr(estimated, measured).statistic) if len(picked) > 2 else float("nan")
    r = float(pearsonr(summed, plan_measured).statistic) if plans > 2 else float("nan")
    ratios = np.array(plan_measured) / np.maximum(np.array(summed), 1e-30)
    return Validation(
        pairs=len(picked),
        spearman=rho,
        plans=plans,
        additivity_pearson=r,
        additivity_ratio=float(np.median(ratios)) if plans else float("nan"),
        seconds=round(time.perf_counter() - started, 2),
        batches=len(measured_on),
    )


def _fitting(model: nn.Module, batches: list[Any], task: Task) -> list[Any]:
    """The first of `batches` whose FP outputs, which the measurement keeps, fit in
    `REFERENCE_BYTES` (at least one): a 262k vocabulary's logits are 0.54 GB per 512-token window."""
    with torch.no_grad():
        out = task.forward(model, batches[0])
    per_batch = out.numel() * out.element_size()
    del out
    return batches[: max(1, REFERENCE_BYTES // max(1, per_batch))]
