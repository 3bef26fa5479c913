"""Empirical-Fisher output score: the sensitivity of every (layer, choice) from a few passes.

For a layer with weight `W`, output `Y` and a quantization error `ΔW` (choice `c`), the
first-order change of a pseudo-label loss on sample `s` is

    a[s, c] = Σ g_Y ⊙ ΔY = ⟨ΔW_c, G_s⟩,   G_s = Σ_tokens g_Y xᵀ  (the per-sample weight gradient)

where `g_Y` is the output-gradient for pseudo-labels drawn from the model's own output
distribution. Its second moment over draws is `ΔYᵀ Jᵀ F J ΔY` (Gauss-Newton), the
second-order loss increase, so the score

    s[l, c] = ½ mean_{samples, draws} a[s, c]²

estimates the expected divergence of the output when only layer `l` takes choice `c`, in the
task's units (`Task.loss_units`). Cross terms between tokens of a sample are kept (the sum is
taken before squaring), which is what makes the ranking of layers right.

Cost: one forward pass and `draws` backward passes to the layer outputs per batch (no
parameter gradients); every choice is then scored from `G_s` by one matrix product. Modules
sharing one weight add their `a` before squaring, so tied weights are scored jointly.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cost import layer_bops, layer_bytes
from .layers import QuantTarget, find_targets, fingerprint_model, fixed_bytes, fp16_bytes
from .quantize import as_matrix, fake_quantize
from .specs import Choice, ChoiceProfile, LayerProfile, ProfileError, ProfileTable
from .tasks import Task, infer_task

__all__ = ["ProgressFn", "fingerprint_batches", "profile_fisher"]

ProgressFn = Callable[[str, int, int], None]
"""Called as `progress(stage, done, total)` while profiling."""

# Per-sample weight gradients are built in chunks of at most this many elements.
_MAX_CHUNK_ELEMENTS = 1 << 25


@dataclass
class _Call:
    """One call of a quantizable module during the forward pass."""

    target: int
    module: nn.Module
    inp: Tensor
    out: Tensor


def fingerprint_batches(batches: Sequence[Any]) -> str:
    """SHA-256 over every tensor in the calibration batches (keys, shapes, values), hex."""
    h = hashlib.sha256()

    def visit(obj: Any, key: str = "") -> None:
        if isinstance(obj, Tensor):
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


def _batch_size(batch: Any) -> int | None:
    """Leading dimension of the first tensor in a batch (None when there is no tensor)."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() else None
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        n = _batch_size(item)
        if n is not None:
            return n
    return None


def _weight_errors(weight: Tensor, choices: Sequence[Choice]) -> Tensor:
    """`[C, rows, cols]` stack of `fake_quantize(W, c) - W` in float32."""
    w = as_matrix(weight.detach()).float()
    return torch.stack([as_matrix(fake_quantize(w, c)) - w for c in choices])


def _per_sample_scores(g3: Tensor, x3: Tensor, errors: Tensor) -> Tensor:
    """`a[s, c] = ⟨ΔW_c, g_sᵀ x_s⟩` for `g3 [n, T, out]`, `x3 [n, T, in]`, `errors [C, out, in]`."""
    n = g3.shape[0]
    flat_err = errors.reshape(errors.shape[0], -1)
    per_sample = max(1, errors.shape[1] * errors.shape[2])
    chunk = max(1, _MAX_CHUNK_ELEMENTS // per_sample)
    parts = []
    for i in range(0, n, chunk):
        grad_w = torch.bmm(g3[i : i + chunk].transpose(1, 2), x3[i : i + chunk])
        parts.append(grad_w.reshape(grad_w.shape[0], -1) @ flat_err.T)
    return torch.cat(parts)


def _linear_scores(call: _Call, g: Tensor, errors: Tensor) -> Tensor:
    n = g.shape[0]
    x3 = call.inp.detach().float().reshape(n, -1, call.inp.shape[-1])
    g3 = g.float().reshape(n, -1, g.shape[-1])
    return _per_sample_scores(g3, x3, errors)


def _conv_padded_input(mod: nn.Conv2d, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
    if not isinstance(mod.padding, str):
        return x, tuple(mod.padding)  # type: ignore[return-value]
    if mod.padding == "valid":
        return x, (0, 0)
    pads: list[int] = []
    for k, d in zip(reversed(mod.kernel_size), reversed(mod.dilation), strict=True):  # w then h
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads), (0, 0)


def _conv2d_scores(call: _Call, g: Tensor, errors: Tensor) -> Tensor:
    mod = call.module
    assert isinstance(mod, nn.Conv2d)
    n = g.shape[0]
    x, padding = _conv_padded_input(mod, call.inp.detach().float())
    cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=padding, stride=mod.stride)
    groups, out_ch = mod.groups, mod.out_channels
    length = cols.shape[-1]
    g3 = g.float().reshape(n, out_ch, length)
    if groups == 1:
        return _per_sample_scores(g3.transpose(1, 2), cols.transpose(1, 2), errors)
    gg = g3.reshape(n, groups, out_ch // groups, length)
    cc = cols.reshape(n, groups, -1, length)
    grad_w = torch.einsum("ngol,ngil->ngoi", gg, cc).reshape(n, -1)
    return grad_w @ errors.reshape(errors.shape[0], -1).T


def _embedding_scores(call: _Call, g: Tensor, rows: Tensor, row_errors: Tensor) -> Tensor:
    """Scores for an embedding: only the rows this batch looked up can change its output."""
    n = g.shape[0]
    dim = g.shape[-1]
    inv = torch.searchsorted(rows, call.inp.reshape(n, -1).contiguous())
    flat = (torch.arange(n, device=inv.device).unsqueeze(1) * rows.numel() + inv).reshape(-1)
    grad_rows = torch.zeros(n * rows.numel(), dim, dtype=torch.float32, device=g.device)
    grad_rows.index_add_(0, flat, g.float().reshape(-1, dim))
    return grad_rows.reshape(n, -1) @ row_errors.reshape(row_errors.shape[0], -1).T


def _call_macs(call: _Call) -> int:
    mod = call.module
    if isinstance(mod, nn.Linear):
        return call.inp.numel() // mod.in_features * mod.in_features * mod.out_features
    if isinstance(mod, nn.Conv2d):
        return call.out.numel() * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
    return 0  # embedding lookups do no multiply-accumulates


def profile_fisher(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    choices: Sequence[Choice],
    task: Task | None = None,
    draws: int = 4,
    seed: int = 0,
    act_bits: int = 16,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    model_name: str = "",
    progress: ProgressFn | None = None,
) -> ProfileTable:
    """Estimate the loss increase of every (layer, choice) with the empirical-Fisher output score.

    Args:
        model: the FP model; its weights are not changed.
        batches: calibration batches (see `profilers.tasks.call_model` for their form).
        choices: the options to score for every layer (include `Choice.fp16()` to allow
            leaving a layer unquantized).
        task: what the output is; inferred from the first batch when None.
        draws: pseudo-label draws per batch (backward passes); more draws, less noise.
        seed: seed of the pseudo-label draws.
        act_bits: activation bits assumed by the BOPs cost.
        include: fnmatch patterns of layer names to quantize.
        exclude: fnmatch patterns of layer names to keep in floating point.
        model_name: recorded in the profile.
        progress: optional callback `(stage, done, total)`.

    Returns:
        A `ProfileTable` with, per layer and choice, bytes, BOPs per sample and the estimated
        loss with its Monte Carlo standard error.

    Example:
        >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> data = [torch.randn(8, 16) for _ in range(2)]
        >>> table = profile_fisher(model, data, choices=[Choice(bits=4, group_size=16), Choice.fp16()])
        >>> [layer.spec.name for layer in table.layers]
        ['0', '2']
    """
    batches = list(batches)
    choices = list(dict.fromkeys(choices))
    if not batches:
        raise ProfileError("no calibration batches were given; pass at least one batch of inputs")
    if not choices:
        raise ProfileError("no choices to profile; give at least one bits/terms/group setting")
    if draws < 1:
        raise ProfileError(f"draws must be at least 1, got {draws}")
    targets = find_targets(model, include=include, exclude=exclude)
    task = task or infer_task(model, batches[0])
    report = progress or (lambda stage, done, total: None)

    n_choices = len(choices)
    module_target = {id(m): i for i, t in enumerate(targets) for m in t.modules}
    errors: dict[int, Tensor] = {}
    for i, t in enumerate(targets):
        report("quantizing", i, len(targets))
        if t.spec.kind != "embedding":
            errors[i] = _weight_errors(t.weight, choices)
    report("quantizing", len(targets), len(targets))

    sum2 = [torch.zeros(n_choices, dtype=torch.float64) for _ in targets]
    sum4 = [torch.zeros(n_choices, dtype=torch.float64) for _ in targets]
    macs = [0] * len(targets)
    first_call: dict[int, int] = {}
    n_scored = 0
    n_samples = 0
    generator = torch.Generator().manual_seed(seed)

    was_training = model.training
    grad_flags = [t.weight.requires_grad for t in targets]
    model.eval()
    try:
        for t in targets:
            t.weight.requires_grad_(True)
        for b, batch in enumerate(batches):
            report("scoring", b, len(batches))
            calls: list[_Call] = []
            batch_n = _batch_size(batch)

            def hook(mod: nn.Module, args: tuple[Any, ...], out: Tensor, calls=calls, n=batch_n) -> Tensor:
                inp = args[0]
                if n is not None and n > 1 and out.shape[0] == 1 and inp.shape[0] == 1:
                    # One lookup broadcast over the batch (e.g. position ids [1, T]): give each
                    # sample its own copy so its gradient stays per sample.
                    inp = inp.expand(n, *inp.shape[1:])
                    out = out.expand(n, *out.shape[1:])
                calls.append(_Call(module_target[id(mod)], mod, inp, out))
                # Later in-place ops (ReLU(inplace=True), `+=`) change the copy returned here,
                # not the tensor whose gradient we take.
                return out.clone()

            handles = [m.register_forward_hook(hook) for t in targets for m in t.modules]
            try:
                with torch.enable_grad():
                    out = task.forward(model, batch)
            finally:
                for h in handles:
                    h.remove()
            n = out.shape[0]
            n_samples += n
            for call in calls:
                first_call.setdefault(call.target, len(first_call))
                macs[call.target] += _call_macs(call)
                if call.inp.shape[0] != n:
                    raise ProfileError(
                        f"layer {targets[call.target].spec.name!r} sees inputs of shape {tuple(call.inp.shape)} "
                        f"whose first dimension is not the batch size {n}; "
                        "the Fisher profiler needs batch-first activations"
                    )
            rows_errors = _embedding_row_errors(targets, calls, choices)
            outs = [c.out for c in calls]
            for d in range(draws):
                v = task.pseudo_gradient(out, batch, generator)
                grads = torch.autograd.grad(out, outs, grad_outputs=v, retain_graph=d < draws - 1, allow_unused=True)
                first_order: dict[int, Tensor] = {}
                for call, g in zip(calls, grads, strict=True):
                    if g is None:
                        continue
                    if call.target in rows_errors:
                        rows, row_err = rows_errors[call.target]
                        a = _embedding_scores(call, g, rows, row_err)
                    elif isinstance(call.module, nn.Conv2d):
                        a = _conv2d_scores(call, g, errors[call.target])
                    else:
                        a = _linear_scores(call, g, errors[call.target])
                    first_order[call.target] = first_order.get(call.target, 0) + a
                for ti, a in first_order.items():
                    a2 = a.double().square()
                    sum2[ti] += a2.sum(dim=0)
                    sum4[ti] += a2.square().sum(dim=0)
                n_scored += n
            del calls, outs, out
        report("scoring", len(batches), len(batches))
    finally:
        for t, flag in zip(targets, grad_flags, strict=True):
            t.weight.requires_grad_(flag)
        model.train(was_training)

    seen = [i for i in range(len(targets)) if i in first_call]
    unseen = [targets[i].spec.name for i in range(len(targets)) if i not in first_call]
    if unseen:
        warnings.warn(
            f"{len(unseen)} layer(s) never ran during calibration and stay in fp16: {', '.join(unseen[:5])}",
            stacklevel=2,
        )
    if not seen:
        raise ProfileError("no quantizable layer ran during calibration; check the batches and the task")
    seen.sort(key=lambda i: first_call[i])

    layers = []
    for order, i in enumerate(seen):
        t = targets[i]
        spec = t.spec.model_copy(update={"macs": round(macs[i] / n_samples), "order": order})
        mean2 = sum2[i] / n_scored
        var2 = (sum4[i] / n_scored - mean2.square()).clamp_min(0)
        stderr = 0.5 * (var2 / n_scored).sqrt()
        options = tuple(
            ChoiceProfile(
                choice=c,
                bytes=layer_bytes(spec, c),
                bops=layer_bops(spec, c, act_bits),
                loss=float(0.5 * mean2[j]),
                loss_stderr=float(stderr[j]),
            )
            for j, c in enumerate(choices)
        )
        layers.append(LayerProfile(spec=spec, options=options))

    kept = [targets[i] for i in seen]
    return ProfileTable(
        model_name=model_name,
        model_fingerprint=fingerprint_model(model),
        data_fingerprint=fingerprint_batches(batches),
        profiler="fisher",
        settings={"draws": draws, "seed": seed, "task": task.describe(), "samples": n_samples},
        loss_units=task.loss_units,
        act_bits=act_bits,
        fixed_bytes=fixed_bytes(model, kept),
        fp16_bytes=fp16_bytes(model),
        kept_fp16=tuple(unseen),
        layers=tuple(layers),
    )


def _embedding_row_errors(
    targets: Sequence[QuantTarget], calls: Sequence[_Call], choices: Sequence[Choice]
) -> dict[int, tuple[Tensor, Tensor]]:
    """For each embedding called in this batch: the sorted rows looked up and their
    quantization errors `[C, rows, dim]` (rows quantize independently of each other)."""
    out: dict[int, tuple[Tensor, Tensor]] = {}
    for call in calls:
        t = targets[call.target]
        if t.spec.kind != "embedding":
            continue
        ids = call.inp.reshape(-1)
        prev = out.get(call.target)
        rows = torch.unique(ids if prev is None else torch.cat([prev[0], ids]))
        out[call.target] = (rows, torch.empty(0))
    for ti, (rows, _) in out.items():
        out[ti] = (rows, _weight_errors(targets[ti].weight.detach()[rows], choices))
    return out
