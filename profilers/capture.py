"""Recording what the quantizable modules see during a forward pass (forward hooks)."""

from __future__ import annotations

import math
from collections.abc import Container, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import QuantTarget
from .types import ProfileError

__all__ = ["Call", "batch_size", "call_macs", "capture_calls", "check_batch_first", "conv_patches"]


@dataclass
class Call:
    """One call of a quantizable module: which weight, the module, its input and output."""

    target: int
    module: nn.Module
    inp: Tensor
    out: Tensor


def batch_size(batch: Any) -> int | None:
    """Leading dimension of the first tensor in a batch (None when there is no tensor)."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() else None
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        n = batch_size(item)
        if n is not None:
            return n
    return None


@contextmanager
def capture_calls(
    targets: Sequence[QuantTarget] | Mapping[int, QuantTarget],
    batch: Any,
    *,
    isolate: bool = True,
    shapes_only: Container[int] = (),
) -> Iterator[list[Call]]:
    """Record every call of the targets' modules during the forward passes run inside.

    Args:
        targets: the quantizable weights (a list, or some of them by target index).
        batch: the batch about to be run (its leading dimension is the number of samples).
        isolate: return a copy of each output to the rest of the model, so in-place ops after
            the layer (`ReLU(inplace=True)`, `+=`) change the copy and not the recorded tensor
            whose gradient is taken.
        shapes_only: targets whose calls keep only the shapes of their input and output
            (tensors on the meta device), so a pass that only counts holds no activations.
    """
    indexed = targets.items() if isinstance(targets, Mapping) else enumerate(targets)
    module_target = {id(m): i for i, t in indexed for m in t.modules}
    calls: list[Call] = []
    metas: dict[tuple[int, torch.Size], Tensor] = {}
    n = batch_size(batch)

    def hook(mod: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor | None:
        inp = args[0]
        if n is not None and n > 1 and out.shape[0] == 1 and inp.shape[0] == 1:
            # One lookup broadcast over the batch (e.g. position ids [1, T]): give each sample
            # its own copy so its gradient stays per sample.
            inp = inp.expand(n, *inp.shape[1:])
            out = out.expand(n, *out.shape[1:])
            calls.append(Call(module_target[id(mod)], mod, inp, out))
            return out.clone() if isolate else out
        target = module_target[id(mod)]
        if target in shapes_only:
            key = (inp.data_ptr(), inp.shape)  # layers fed one input (q, k, v) share one stand-in
            if key not in metas:
                metas[key] = inp.to("meta")
            calls.append(Call(target, mod, metas[key], out.to("meta")))
        else:
            calls.append(Call(target, mod, inp, out))
        return out.clone() if isolate else None

    values = targets.values() if isinstance(targets, Mapping) else targets
    handles = [m.register_forward_hook(hook) for t in values for m in t.modules]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def check_batch_first(calls: Sequence[Call], targets: Sequence[QuantTarget], n: int) -> None:
    """Raise if a layer's input does not lead with the batch dimension `n`."""
    for call in calls:
        if call.inp.shape[0] != n:
            raise ProfileError(
                f"layer {targets[call.target].spec.name!r} sees inputs of shape {tuple(call.inp.shape)} "
                f"whose first dimension is not the batch size {n}; the profilers need batch-first activations"
            )


def call_macs(call: Call) -> int:
    """Multiply-accumulates of one call (0 for embedding lookups)."""
    mod = call.module
    if isinstance(mod, nn.Linear):
        return call.inp.numel() // mod.in_features * mod.in_features * mod.out_features
    if isinstance(mod, nn.Conv2d):
        return call.out.numel() * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
    return 0


def conv_patches(mod: nn.Conv2d, x: Tensor) -> Tensor:
    """The input patches a Conv2d multiplies with its weight: `[n, in * kh * kw, positions]`."""
    padding: tuple[int, ...] | int
    if not isinstance(mod.padding, str):
        padding = tuple(mod.padding)
    elif mod.padding == "valid":
        padding = 0
    else:  # "same": pad as torch does, possibly one more on the right/bottom
        pads: list[int] = []
        for k, d in zip(reversed(mod.kernel_size), reversed(mod.dilation), strict=True):  # w then h
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        x, padding = F.pad(x, pads), 0
    return F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=padding, stride=mod.stride)
