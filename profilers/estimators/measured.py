"""Ground truth: quantize one layer with one option and measure the output divergence.

The divergence is the task's (`Task.divergence`: ½‖Δe‖² for embeddings, KL for logits), on
the calibration batches, against the FP model's outputs: the quantity the proxies estimate.

Upstream work is not repeated. Before the measurements, one pass records the outputs of
*replayable* modules: children of the root model and of any `nn.ModuleList`/`nn.Sequential`
(embeddings, transformer blocks, stages of a CNN). When layer `l` is measured, every such
module whose calls all finished before `l` first runs (and that does not contain `l`) returns
its recorded output instead of recomputing it: a layer in the last block re-runs only that
block and the head. The replay is checked against the FP outputs once per layer and falls back
to full forward passes if it does not reproduce them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map_only

from ..capture import call_macs, capture_calls
from ..layers import QuantTarget
from ..quant.quantize import as_matrix
from ..quant.rounding import fake_quantize
from ..tasks import Task
from ..types import Choice
from .base import Estimates, LayerEstimate, Profiler, ProfileRun

__all__ = ["REPLAY_CHECKS", "MeasuredProfiler", "OutputMeter", "row_order_by_activation"]

REPLAY_CHECKS = 4  # targets whose replay is checked against the model's own output


def _replayable(model: nn.Module) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if module is model:
            continue
        for child_name, child in module.named_children() if isinstance(module, (nn.ModuleList, nn.Sequential)) else ():
            out[f"{name}.{child_name}" if name else child_name] = child
    for child_name, child in model.named_children():
        out.setdefault(child_name, child)
    return out


class OutputMeter:
    """Measures the task divergence of the model's outputs from the FP outputs.

    Args:
        model: the FP model (weights are changed only inside `measure_layer`/`measure_plan`).
        targets: the quantizable weights.
        batches: calibration batches.
        task: output kind and divergence.
        replay: reuse recorded outputs of modules upstream of the layer being measured.
    """

    def __init__(
        self,
        model: nn.Module,
        targets: Sequence[QuantTarget],
        batches: Sequence[Any],
        task: Task,
        *,
        replay: bool = True,
    ) -> None:
        self.model = model
        self.targets = list(targets)
        self.batches = list(batches)
        self.task = task
        self.macs = dict.fromkeys(range(len(self.targets)), 0)
        self.first_call: dict[int, int] = {}
        self.samples = 0
        self._cached: dict[int, list[str]] = {}
        self._store: list[dict[str, list[Any]]] = []
        self.reference = self._record(replay)
        self.replay = replay and self._check_replay()

    # -- recording --------------------------------------------------------------------------
    def _record(self, replay: bool) -> list[Tensor]:
        """Find, per target, the replayable modules that finish before it first runs, then run
        every batch once, storing those modules' outputs and the model's reference output."""
        candidates = _replayable(self.model) if replay else {}
        events, starts = self._timeline(candidates)
        ancestors = {
            i: {n for n, m in self.model.named_modules() if any(_contains(m, tm) for tm in t.modules)}
            for i, t in enumerate(self.targets)
        }
        needed: set[str] = set()
        for i, start in starts.items():
            done = [n for n, ev in events.items() if n not in ancestors[i] and all(end < start for _, end in ev)]
            maximal = [n for n in done if not any(n != o and n.startswith(o + ".") for o in done)]
            self._cached[i] = maximal
            needed.update(maximal)
        return self._run_and_store({name: candidates[name] for name in needed})

    def _timeline(self, candidates: dict[str, nn.Module]) -> tuple[dict[str, list[tuple[int, int]]], dict[int, int]]:
        """On the first batch: each candidate's calls as (start, end) ticks, and each target's
        first start tick."""
        names = {id(m): n for n, m in self.model.named_modules()}
        target_of = {id(m): i for i, t in enumerate(self.targets) for m in t.modules}
        events: dict[str, list[tuple[int, int]]] = {}
        starts: dict[int, int] = {}
        clock = [0]
        stack: dict[int, list[int]] = {}

        def pre(mod: nn.Module, args: Any) -> None:
            clock[0] += 1
            stack.setdefault(id(mod), []).append(clock[0])
            if id(mod) in target_of:
                starts.setdefault(target_of[id(mod)], clock[0])

        def post(mod: nn.Module, args: Any, out: Any) -> None:
            clock[0] += 1
            begin = stack[id(mod)].pop()
            if names.get(id(mod)) in candidates:
                events.setdefault(names[id(mod)], []).append((begin, clock[0]))

        watched = {id(m): m for m in candidates.values()} | {id(m): m for t in self.targets for m in t.modules}
        handles = [m.register_forward_pre_hook(pre) for m in watched.values()]
        handles += [m.register_forward_hook(post) for m in watched.values()]
        try:
            with torch.no_grad(), capture_calls(self.targets, self.batches[0], isolate=False) as calls:
                self.task.forward(self.model, self.batches[0])
        finally:
            for h in handles:
                h.remove()
        for call in calls:
            self.first_call.setdefault(call.target, len(self.first_call))
        return events, starts

    def _run_and_store(self, kept: dict[str, nn.Module]) -> list[Tensor]:
        """Run every batch; keep the outputs of the `kept` modules and the model's output."""

        def keep(name: str):
            def hook(mod: nn.Module, args: Any, out: Any) -> None:
                self._store[-1].setdefault(name, []).append(tree_map_only(Tensor, lambda t: t.detach(), out))

            return hook

        reference = []
        store_hooks = [module.register_forward_hook(keep(name)) for name, module in kept.items()]
        try:
            for batch in self.batches:
                self._store.append({})
                with torch.no_grad(), capture_calls(self.targets, batch, isolate=False) as calls:
                    out = self.task.forward(self.model, batch)
                reference.append(out.detach())
                self.samples += out.shape[0]
                for call in calls:
                    self.macs[call.target] += call_macs(call)
        finally:
            for h in store_hooks:
                h.remove()
        return reference

    def _check_replay(self) -> bool:
        """Whether replaying recorded upstream outputs reproduces the model's output, checked on
        the first batch for up to `REPLAY_CHECKS` targets spread over the model (a forward pass
        each: for every target of a 262k-vocabulary model that was 20 minutes)."""
        cached = [i for i in self._cached if self._cached[i]]
        picked = sorted({cached[round(k * (len(cached) - 1) / max(1, REPLAY_CHECKS - 1))]
                         for k in range(REPLAY_CHECKS)}) if cached else []  # fmt: skip
        for i in picked:
            with torch.no_grad(), self._replaying(i, 0):
                out = self.task.forward(self.model, self.batches[0])
            ref = self.reference[0]
            if out.shape != ref.shape or not torch.allclose(
                out, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max() + 1)
            ):
                warnings.warn(
                    "replaying upstream outputs did not reproduce the model's outputs;"
                    " measuring with full forward passes",
                    stacklevel=3,
                )
                return False
        return True

    @contextmanager
    def _replaying(self, target: int, batch: int) -> Iterator[None]:
        modules = _replayable(self.model)
        patched = []
        for name in self._cached.get(target, []):
            outputs = iter(self._store[batch][name])
            mod = modules[name]

            def forward(*args: Any, _outputs=outputs, **kwargs: Any) -> Any:
                return tree_map_only(Tensor, lambda t: t.clone(), next(_outputs))

            mod.forward = forward  # type: ignore[method-assign]
            patched.append(mod)
        try:
            yield
        finally:
            for mod in patched:
                del mod.forward

    # -- measuring --------------------------------------------------------------------------
    def _divergence(self, target: int | None) -> tuple[float, float]:
        values = []
        with torch.no_grad():
            for b, batch in enumerate(self.batches):
                if target is not None and self.replay:
                    with self._replaying(target, b):
                        out = self.task.forward(self.model, batch)
                else:
                    out = self.task.forward(self.model, batch)
                values.append(self.task.divergence(self.reference[b], out, batch).double())
        v = torch.cat(values)
        return float(v.mean()), float(v.std() / max(1.0, len(v) ** 0.5)) if len(v) > 1 else 0.0

    def measure_layer(self, target: int, weight: Tensor) -> tuple[float, float]:
        """Mean divergence (and its standard error over samples) with one weight replaced."""
        return self.measure_plan({target: weight}, replay_target=target)

    def measure_plan(self, weights: dict[int, Tensor], *, replay_target: int | None = None) -> tuple[float, float]:
        """Mean divergence with several weights replaced at once (restored afterwards)."""
        saved = {i: self.targets[i].weight.detach().clone() for i in weights}
        try:
            with torch.no_grad():
                for i, w in weights.items():
                    self.targets[i].weight.copy_(w)
            return self._divergence(replay_target)
        finally:
            with torch.no_grad():
                for i, w in saved.items():
                    self.targets[i].weight.copy_(w)


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def row_order_by_activation(weight: Tensor, base: Choice, nxt: Choice, energy: tuple[str, Tensor] | None) -> np.ndarray:
    """Rows ordered by how much of their squared error the next term removes, weighted by
    `energy`: `("cols", diag of XᵀX)` for a Linear, `("rows", lookups per row)` for an Embedding."""
    w = as_matrix(weight.detach()).float()
    gain = (fake_quantize(w, base) - w).square() - (fake_quantize(w, nxt) - w).square()
    if energy is not None:
        axis, values = energy
        gain = gain * (values if axis == "cols" else values.unsqueeze(1))
    return np.argsort(-gain.sum(dim=1).double().numpy(), kind="stable")


class MeasuredProfiler(Profiler):
    """Measured single-layer divergence for every (layer, option): the ground truth.

    Costs one (partly replayed) forward pass over the calibration batches per (layer, option).

    Args:
        replay: reuse recorded upstream outputs (see the module docstring).
        orders: row orders for fractional options, `{layer: {base label: order}}` (e.g. from
            another profile, to measure the same row sets); missing ones are computed from the
            weights and the inputs' energy.
    """

    name: ClassVar[str] = "measured"
    _mutates_weights: ClassVar[bool] = True

    def __init__(self, *, replay: bool = True, orders: dict[str, dict[str, np.ndarray]] | None = None) -> None:
        self.replay = replay
        self.orders = orders or {}

    def _estimate(self, run: ProfileRun) -> Estimates:
        meter = OutputMeter(run.model, run.targets, run.batches, run.task, replay=self.replay)
        pairs = any(lay.pairs for lay in run.layouts)
        energy = _input_energy(run.model, run.targets, run.batches, run.task) if pairs else {}
        layers = {}
        called = sorted(meter.first_call)
        total = sum(len(run.layouts[i].options) for i in called)
        done = 0
        for i in called:
            t, layout = run.targets[i], run.layouts[i]
            orders = dict(self.orders.get(t.spec.name, {}))
            for p, pair in enumerate(layout.pairs):
                label = layout.pair_label(p)
                if label not in orders:
                    orders[label] = row_order_by_activation(
                        t.weight, layout.stack[pair.base], layout.stack[pair.next], energy.get(i)
                    )
            options = layout.options
            loss = np.zeros(len(options))
            stderr = np.zeros(len(options))
            for j, c in enumerate(options):
                run.report("measuring", done, total)
                done += 1
                rows = None
                if c.extra:
                    rows = torch.as_tensor(np.sort(orders[c.base.label][: c.extra_rows(t.spec.rows)]))
                loss[j], stderr[j] = meter.measure_layer(i, run.quantizer.reconstruct(i, t.weight.detach(), c, rows))
            layers[i] = LayerEstimate(loss=loss, stderr=stderr, orders=orders)
        run.report("measuring", total, total)
        return Estimates(
            layers=layers,
            macs={i: round(m / max(1, meter.samples)) for i, m in meter.macs.items()},
            first_call=meter.first_call,
            samples=meter.samples,
            settings={"replay": meter.replay},
        )


def _input_energy(
    model: nn.Module, targets: Sequence[QuantTarget], batches: Sequence[Any], task: Task
) -> dict[int, tuple[str, Tensor]]:
    """Per target: sum of squared inputs per weight column (Linear), or lookups per row (Embedding)."""
    energy: dict[int, tuple[str, Tensor]] = {}
    with torch.no_grad():
        for batch in batches:
            with capture_calls(targets, batch, isolate=False) as calls:
                task.forward(model, batch)
            for call in calls:
                t = targets[call.target]
                if isinstance(call.module, nn.Embedding):
                    axis = "rows"
                    e = torch.zeros(t.spec.rows).index_add_(0, call.inp.reshape(-1), torch.ones(call.inp.numel()))
                elif isinstance(call.module, nn.Linear):
                    axis = "cols"
                    e = call.inp.detach().float().reshape(-1, call.inp.shape[-1]).square().sum(dim=0)
                else:
                    continue  # conv: weight-space order
                if call.target in energy and energy[call.target][0] == axis:
                    e = e + energy[call.target][1]
                energy[call.target] = (axis, e)
    return energy
