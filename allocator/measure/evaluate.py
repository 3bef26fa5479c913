"""The plan against the FP model, uniform settings and peers, measured on the same batches.

Measured, not estimated: each variant is a copy of the FP model with the plan (or a uniform
setting, or a peer quantizer's result) applied, run on held-out evaluation batches; the
metrics are those of `metrics`. The plan is also run on its calibration batches, where its
predicted loss was estimated, to check that estimate.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from profilers.estimators.base import split_scored
from profilers.tasks import Task
from profilers.types import Choice

from ..planning.plan import Plan, UniformPoint
from ..quantized.apply import apply_choices_, apply_plan_, quantize_plan_
from ..quantized.refine import BlockRefinement
from ..quantized.tune import Tuning
from .metrics import METRICS, FpOutputs, Measured, check_metric, each_output, measure_outputs, metrics_for
from .peers import PeerSkipped, PeerVariant

__all__ = ["Comparison", "compare", "default_metric", "default_uniform"]


@dataclass
class Comparison:
    """FP model, the plan, uniform settings and peers, measured on the same evaluation data."""

    fp: Measured
    plan: Measured
    uniform: list[Measured] = field(default_factory=list)
    metric: str = "cosine"
    peers: list[Measured] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # peers not run, and why
    plan_on_calibration: float | None = None  # the plan's measured loss on the batches it was scored on
    unrefined: Measured | None = None  # the plan as rounded: without `plan.refine_steps` and `plan.tune_steps`
    refined: list[BlockRefinement] = field(default_factory=list)  # the plan's block reconstruction, per block
    tuned: Tuning | None = None  # the plan's end-to-end tuning

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
        return [self.fp, self.plan, *([self.unrefined] if self.unrefined else []), *self.uniform, *self.peers]


def default_metric(task: Task, fp: Measured) -> str:
    """The metric a model kind is judged by: cosine for embeddings, perplexity for causal LMs,
    accuracy when the batches carry labels, else top-1 agreement with FP."""
    if task.output == "embedding":
        return "cosine"
    if fp.perplexity is not None:
        return "perplexity"
    return "accuracy" if fp.accuracy is not None else "agreement"


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
    calibration: Sequence[Any] | None = None,
    peers: Sequence[PeerVariant] = (),
    skipped: Sequence[str] = (),
    metric: str | None = None,
    block_progress: Callable[[str, int, int], None] | None = None,
    other: Sequence[Any] | None = None,
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
        calibration: or the calibration batches to take them from, block by block (sequentially
            for a `plan.sequential` plan, which needs them), for the plan and the uniform settings.
            The plan is also measured on those its predicted loss was estimated on
            (`Comparison.plan_on_calibration`, `Plan.scored_batches`), the prediction's own check.
        peers: other quantizers' settings (`allocator.peers.peer_variants`), built one at a time.
        skipped: why peers that were asked for are missing, carried into the result (with the
            peers whose build says it cannot serve this plan, `PeerSkipped`).
        metric: a name of `METRICS` to rank by (default: `default_metric`).
        block_progress: `(stage, done, total)` callback for the plan's block reconstruction.
        other: batches of text of another domain than the calibration data's; every row is also
            measured there (`Measured.elsewhere`).

    A plan with block reconstruction or end-to-end tuning (`plan.refine_steps`, `plan.tune_steps`)
    is also measured without them (`Comparison.unrefined`), and that is the model its prediction
    is checked on (`plan_on_calibration`); uniform settings are rounded without them.
    """
    note = progress or (lambda label: None)
    check_metric(metric, metrics_for(task, batches, words=words is not None))
    if fp_bytes is None:
        fp_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    note("FP")
    bench = _Bench(model, batches, task, words, other)
    fp = bench.measure_fp(size=fp_bytes, bpw=None, predicted=0.0)

    def variant(label: str, make: Callable[[], nn.Module], **kw: Any) -> Measured:
        note(label)
        t0 = time.perf_counter()
        made = make()
        return bench.measure(label, made, time.perf_counter() - t0, **kw)

    if plan.sequential and calibration is not None:
        hessians = None  # each variant takes its own, on its own quantized blocks
    rounding = {"hessians": hessians, "calibration": calibration, "task": task}
    plan_row, unrefined, on_calibration, made = _measure_plan(bench, model, plan, rounding, note, block_progress)
    rows = []
    for u in list(uniform) if uniform is not None else default_uniform(plan):
        make = lambda u=u: apply_choices_(  # noqa: E731
            copy.deepcopy(model), dict.fromkeys(plan.layers, u.choice), method=plan.method, sequential=plan.sequential,
            round_rest_to_fp16=plan.target_format == "native", **rounding,
        )
        label = f"uniform {u.choice.label}"
        rows.append(variant(label, make, size=u.bytes, bpw=u.bpw, predicted=u.loss, fits=u.fits, kind="uniform"))
    peer_rows, skipped = _measure_peers(bench, peers, note, list(skipped))
    return Comparison(fp=fp, plan=plan_row, uniform=rows, metric=metric or default_metric(task, fp), peers=peer_rows,
                      skipped=skipped, plan_on_calibration=on_calibration, unrefined=unrefined,
                      refined=made.refined, tuned=made.tuned)  # fmt: skip


def _measure_plan(
    bench: _Bench,
    model: nn.Module,
    plan: Plan,
    rounding: dict[str, Any],
    note: Callable[[str], None],
    block_progress: Callable[[str, int, int], None] | None,
) -> tuple[Measured, Measured | None, float | None, Any]:
    """The plan's row; the plan as rounded, without --refine/--tune, when it has them; its mean
    divergence on the scored calibration batches (its prediction's check); what the applier made."""
    predicted, calibration, task = plan.predicted, rounding["calibration"], rounding["task"]
    note("plan")
    t0 = time.perf_counter()
    planned = copy.deepcopy(model)
    made = quantize_plan_(planned, plan, **rounding, progress=block_progress)
    plan_row = bench.measure("plan", planned, time.perf_counter() - t0, size=predicted.bytes, bpw=predicted.bpw,
                             predicted=predicted.loss, kind="plan")  # fmt: skip
    unrefined = None
    label = unrefined_label(plan)
    if label is not None:  # what they bought, in the same run; the prediction is the rounding's
        del planned
        note(label)
        t0 = time.perf_counter()
        rounded = plan.model_copy(update={"refine_steps": 0, "tune_steps": 0})
        planned = apply_plan_(copy.deepcopy(model), rounded, **rounding)
        unrefined = bench.measure(label, planned, time.perf_counter() - t0, size=predicted.bytes,
                                  bpw=predicted.bpw, predicted=predicted.loss, kind="plan")  # fmt: skip
    # The prediction is made on the scored calibration batches: the rounded plan's loss there is its check.
    scored = split_scored(calibration, plan.scored_batches)[0] if calibration else None
    on_calibration = None if not scored else task.mean_divergence(model, planned, scored)
    del planned
    return plan_row, unrefined, on_calibration, made


def _measure_peers(bench: _Bench, peers: Sequence[PeerVariant], note: Callable[[str], None],
                   skipped: list[str]) -> tuple[list[Measured], list[str]]:  # fmt: skip
    """A row per peer quantizer built one at a time, and why the others were skipped."""
    peer_rows = []
    for peer in peers:
        note(peer.label)
        try:
            built = peer.build()
        except PeerSkipped as e:
            skipped.append(str(e))
            continue
        peer_rows.append(bench.measure(built.label, built.model, built.seconds, size=built.bytes, bpw=built.bpw,
                                       predicted=None, fits=built.fits, kind="peer"))  # fmt: skip
        del built
    return peer_rows, skipped


def unrefined_label(plan: Plan) -> str | None:
    """The row of a plan measured as rounded, without what runs after the rounding; None when
    nothing does."""
    after = [flag for flag, steps in (("--refine", plan.refine_steps), ("--tune", plan.tune_steps)) if steps]
    return f"plan without {' '.join(after)}" if after else None


class _Bench:
    """The held-out batches (and those of another domain), the FP outputs on them, and measuring a
    variant against those."""

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Any],
        task: Task,
        words: Callable[[nn.Module], float] | None,
        other: Sequence[Any] | None = None,
    ) -> None:
        self.model, self.batches, self.task, self.words, self.other = model, batches, task, words, other
        self.started = time.perf_counter()
        self.reference = FpOutputs(model, batches, task)
        self.other_reference = FpOutputs(model, other, task) if other else None

    def measure_fp(self, **kw: Any) -> Measured:
        """The FP model's own row (its outputs are the reference)."""
        return self._row("FP", self.model, self.reference, self.started, 0.0, kw, self.other_reference)

    def measure(self, label: str, model: nn.Module, made: float, **kw: Any) -> Measured:
        """`model`'s metrics on the batches; `made`: seconds it took to make the variant."""
        started = time.perf_counter()
        return self._row(label, model, each_output(model, self.batches, self.task), started, made, kw)

    def _row(
        self,
        label: str,
        model: nn.Module,
        outs: Iterable[Tensor],
        started: float,
        made: float,
        kw: dict[str, Any],
        other_outs: Iterable[Tensor] | None = None,
    ) -> Measured:
        score = self.words(model) if self.words is not None else None
        row = measure_outputs(label, outs, self.batches, self.task, self.reference, wordsim=score, started=started,
                              quantize_seconds=made, **kw)  # fmt: skip
        if self.other:
            outs = each_output(model, self.other, self.task) if other_outs is None else other_outs
            elsewhere = measure_outputs(label, outs, self.other, self.task, self.other_reference, wordsim=None,
                                        started=time.perf_counter(), **kw)  # fmt: skip
            row = dataclasses.replace(row, elsewhere=elsewhere)
        return row


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
