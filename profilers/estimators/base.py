"""The `Profiler` interface shared by every sensitivity estimator.

A profiler estimates, for every quantizable weight and every option, the loss increase when
only that weight takes that option. Subclasses implement `_estimate`; everything else (finding
the weights, expanding fractional options, pricing every option exactly, assembling the
`ProfileTable`) is here, so the estimators differ only in how they estimate.
"""

from __future__ import annotations

import hashlib
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ..capture import Call, call_macs, capture_calls, check_batch_first
from ..input_hessians import input_hessians
from ..layers import QuantTarget, find_targets, fingerprint_model, fixed_bytes, fp16_bytes
from ..quant.cost import layer_bops, layer_bytes
from ..quant.options import OptionLayout, expand_choices, layout_options, needs_hessian, offered
from ..quant.rounding import METHODS, Quantizer
from ..tasks import Task, infer_task
from ..types import Choice, ChoiceProfile, LayerProfile, ProfileError, ProfileTable, encode_indices

__all__ = [
    "CallCounter",
    "Estimates",
    "LayerEstimate",
    "ProfileRun",
    "Profiler",
    "ProgressFn",
    "fingerprint_batches",
    "pseudo_label_passes",
    "split_scored",
]

ProgressFn = Callable[[str, int, int], None]
"""Called as `progress(stage, done, total)` while profiling."""


@dataclass
class LayerEstimate:
    """What an estimator found for one weight.

    Attributes:
        loss: per option, estimated loss increase (task units).
        stderr: per option, standard error of `loss` (0 where exact).
        orders: per fractional pair (base label), the row order for the extra term.
    """

    loss: np.ndarray
    stderr: np.ndarray
    orders: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Estimates:
    """An estimator's output for the whole model.

    Attributes:
        layers: per target index, its estimate (targets that never ran are absent).
        macs: per target index, multiply-accumulates per sample.
        first_call: per target index, position of its first call in the forward pass.
        samples: calibration samples seen.
        settings: estimator settings to record in the profile.
    """

    layers: dict[int, LayerEstimate]
    macs: dict[int, int]
    first_call: dict[int, int]
    samples: int
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProfileRun:
    """What an estimator reads: the model, its calibration batches, the weights to score, their
    options laid out on error stacks, the task, the rounding, and where progress goes."""

    model: nn.Module
    batches: list[Any]
    targets: list[QuantTarget]
    options: list[Choice]
    layouts: list[OptionLayout]
    task: Task
    quantizer: Quantizer
    report: ProgressFn
    extra: list[Any] = field(default_factory=list)  # batches that only feed GPTQ's `H`, not the scores


@dataclass
class CallCounter:
    """Which targets ran (in first-call order), their multiply-accumulates, and the samples seen."""

    first_call: dict[int, int] = field(default_factory=dict)
    macs: dict[int, int] = field(default_factory=dict)
    samples: int = 0

    def see(self, calls: Sequence[Call], n: int) -> None:
        """Count one batch of `n` samples and the calls it made."""
        self.samples += n
        for call in calls:
            self.first_call.setdefault(call.target, len(self.first_call))
            self.macs[call.target] = self.macs.get(call.target, 0) + call_macs(call)

    def estimates(self, layers: dict[int, LayerEstimate], settings: dict[str, Any]) -> Estimates:
        """The `Estimates` of an estimator that scored `layers`, with MACs per sample."""
        return Estimates(
            layers=layers,
            macs={i: round(m / max(1, self.samples)) for i, m in self.macs.items()},
            first_call=self.first_call,
            samples=self.samples,
            settings=settings,
        )


def pseudo_label_passes(
    run: ProfileRun, counter: CallCounter, *, draws: int, seed: int, stage: str
) -> Iterator[tuple[Any, list[Call], int, Iterator[tuple[Tensor | None, ...]]]]:
    """One forward pass per calibration batch with the targets' calls recorded, then `draws`
    backward passes of pseudo-label losses to the targets' outputs (one per class where the
    task enumerates them: `Task.exact_draws`).

    Yields, per batch: the batch, its calls, the index of its first sample, and an iterator of
    the output-gradients of every call (one tuple per draw, computed when asked for). The
    targets' weights take gradients only while this runs.
    """
    generator = torch.Generator().manual_seed(seed)
    flags = [t.weight.requires_grad for t in run.targets]
    try:
        for t in run.targets:
            t.weight.requires_grad_(True)
        for b, batch in enumerate(run.batches):
            run.report(stage, b, len(run.batches))
            with capture_calls(run.targets, batch) as calls, torch.enable_grad():
                out = run.task.forward(run.model, batch)
            check_batch_first(calls, run.targets, out.shape[0])
            first_sample = counter.samples
            counter.see(calls, out.shape[0])
            outs = [c.out for c in calls]

            def gradients(out: Tensor = out, outs: list[Tensor] = outs, batch: Any = batch):
                exact = run.task.exact_draws(out)
                n = exact or draws
                for d in range(n):
                    v = run.task.pseudo_gradient(out, batch, generator, d if exact else None)
                    yield torch.autograd.grad(out, outs, grad_outputs=v, retain_graph=d < n - 1, allow_unused=True)

            yield batch, calls, first_sample, gradients()
            del calls, outs, out
        run.report(stage, len(run.batches), len(run.batches))
    finally:
        for t, flag in zip(run.targets, flags, strict=True):
            t.weight.requires_grad_(flag)


def _offered(options: Sequence[Choice], spec: Any) -> list[Choice]:
    """The options a layer's shape can take; a layer that can take none is refused."""
    mine = [c for c in options if offered(c, spec.cols)]
    if not mine:
        raise ProfileError(
            f"layer {spec.name!r} (rows of {spec.cols} elements) can take none of the choices"
            f" ({', '.join(c.label for c in options[:4])}); add fp16 or a type whose blocks divide {spec.cols}"
        )
    return mine


def split_scored(batches: Sequence[Any], scored: int | None) -> tuple[list[Any], list[Any]]:
    """The `scored` batches the scores read, evenly spaced over `batches` (all when None or
    at least their number), and the others."""
    if scored is not None and scored < 1:
        raise ProfileError(f"scored batches must be at least 1, got {scored}")
    n = len(batches)
    if scored is None or scored >= n:
        return list(batches), []
    picked = {(j * n) // scored for j in range(scored)}
    return [batches[i] for i in sorted(picked)], [b for i, b in enumerate(batches) if i not in picked]


def fingerprint_batches(batches: Sequence[Any]) -> str:
    """SHA-256 over every tensor in the calibration batches (keys, shapes, values), hex."""
    h = hashlib.sha256()

    def visit(obj: Any, key: str = "") -> None:
        if isinstance(obj, torch.Tensor):
            h.update(f"{key}|{tuple(obj.shape)}|{obj.dtype}".encode())
            h.update(obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for k in sorted(obj):
                visit(obj[k], f"{key}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                visit(v, f"{key}[{i}]")

    for b in batches:
        visit(b)
    return h.hexdigest()


class Profiler(ABC):
    """Estimates per-layer, per-option sensitivity and prices every option.

    Subclasses set `name` and implement `_estimate`.
    """

    name: ClassVar[str]

    def profile(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        *,
        choices: Sequence[Choice],
        task: Task | None = None,
        fractions: int = 0,
        fraction_terms: int = 2,
        fraction_bits: int = 8,
        method: str = "rtn",
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        act_bits: int = 16,
        model_name: str = "",
        progress: ProgressFn | None = None,
        scored: int | None = None,
    ) -> ProfileTable:
        """Profile `model` on calibration `batches`.

        Args:
            model: the FP model; its weights are left as they were.
            batches: calibration batches (see `profilers.tasks.call_model` for their form).
            choices: whole-term options for every layer (include `Choice.fp16()` to allow
                leaving a layer unquantized); a layer is offered those its shape can take
                (a llama.cpp block type needs whole blocks per row: `quant.options.offered`).
            task: what the output is; inferred from the first batch when None.
            fractions: when > 1, add options where k/fractions of the rows carry one more term.
            fraction_terms, fraction_bits: only bases whose next term keeps them within this
                many terms and bits per weight get fractions (`expand_choices`).
            method: the rounding the applier will use (`rtn`, `gptq`); choices are scored with
                exactly its errors (GPTQ collects every layer's `H` in one more forward pass).
            include: fnmatch patterns of layer names to quantize.
            exclude: fnmatch patterns of layer names to keep in floating point.
            act_bits: activation bits assumed by the BOPs cost.
            model_name: recorded in the profile.
            progress: optional callback `(stage, done, total)`.
            scored: score on this many of the batches, evenly spaced (None: all). The others
                feed GPTQ's `H` only: GPTQ's errors, like the applier's, come from every batch,
                at the price of forward passes, while the scores' cost grows with the batches
                they read.

        Returns:
            A `ProfileTable` with bytes, BOPs per sample and estimated loss per layer and option.
        """
        batches = list(batches)
        if not batches:
            raise ProfileError("no calibration batches were given; pass at least one batch of inputs")
        if not choices:
            raise ProfileError("no choices to profile; give at least one bits/terms/group setting")
        options = expand_choices(choices, fractions, max_bits=fraction_bits, max_terms=fraction_terms)
        targets = find_targets(model, include=include, exclude=exclude)
        task = task or infer_task(model, batches[0])
        report = progress or (lambda stage, done, total: None)
        layouts = [layout_options(_offered(options, t.spec), t.spec.rows) for t in targets]
        if method not in METHODS:
            raise ProfileError(f"unknown rounding method {method!r}; choose one of {', '.join(METHODS)}")
        scoring, extra = split_scored(batches, scored)
        if not needs_hessian(method):
            extra = []

        was_training = model.training
        saved = [t.weight.detach().clone() for t in targets] if self._mutates_weights else None
        model.eval()
        try:
            quantizer = Quantizer(method)  # type: ignore[arg-type]
            if needs_hessian(method) and self._hessians_up_front:
                quantizer.hessians = input_hessians(model, batches, task, targets, progress=report)
                extra = []  # already in every `H`
            run = ProfileRun(model, scoring, targets, options, layouts, task, quantizer, report, extra)
            est = self._estimate(run)
        finally:
            model.train(was_training)
            if saved is not None:
                with torch.no_grad():
                    for t, w in zip(targets, saved, strict=True):
                        t.weight.copy_(w)
        est.settings["method"] = method
        if len(scoring) < len(batches):
            est.settings["scored_batches"] = len(scoring)
        return self._assemble(model, batches, targets, layouts, task, est, act_bits, model_name, fractions)

    # Estimators that write quantized weights into the model set this, so the base restores them.
    _mutates_weights: ClassVar[bool] = False
    # GPTQ's `H` of every layer is collected before `_estimate` (one more forward pass), unless
    # the estimator collects each layer's just in time.
    _hessians_up_front: ClassVar[bool] = True

    @abstractmethod
    def _estimate(self, run: ProfileRun) -> Estimates:
        """Estimate the loss of every (target, option), quantizing with `run.quantizer`."""

    def _assemble(
        self,
        model: nn.Module,
        batches: list[Any],
        targets: list[QuantTarget],
        layouts: list[OptionLayout],
        task: Task,
        est: Estimates,
        act_bits: int,
        model_name: str,
        fractions: int,
    ) -> ProfileTable:
        seen = sorted((i for i in est.layers if i in est.first_call), key=est.first_call.__getitem__)
        unseen = [targets[i].spec.name for i in range(len(targets)) if i not in est.layers]
        if unseen:
            warnings.warn(
                f"{len(unseen)} layer(s) never ran during calibration and stay in fp16: {', '.join(unseen[:5])}",
                stacklevel=3,
            )
        if not seen:
            raise ProfileError("no quantizable layer ran during calibration; check the batches and the task")
        layers = []
        for order, i in enumerate(seen):
            spec = targets[i].spec.model_copy(update={"macs": est.macs.get(i, 0), "order": order})
            e = est.layers[i]
            layers.append(
                LayerProfile(
                    spec=spec,
                    options=tuple(
                        ChoiceProfile(
                            choice=c,
                            bytes=layer_bytes(spec, c),
                            bops=layer_bops(spec, c, act_bits),
                            loss=max(0.0, float(e.loss[j])),
                            loss_stderr=float(e.stderr[j]),
                        )
                        for j, c in enumerate(layouts[i].options)
                    ),
                    channel_orders={label: encode_indices(order_) for label, order_ in e.orders.items()},
                )
            )
        return ProfileTable(
            model_name=model_name,
            model_fingerprint=fingerprint_model(model),
            data_fingerprint=fingerprint_batches(batches),
            profiler=self.name,
            settings={
                **est.settings,
                "task": task.describe(),
                "samples": est.samples,
                "fractions": fractions,
            },
            loss_units=task.loss_units,
            act_bits=act_bits,
            fixed_bytes=fixed_bytes(model, [targets[i] for i in seen]),
            fp16_bytes=fp16_bytes(model),
            kept_fp16=tuple(unseen),
            layers=tuple(layers),
        )
