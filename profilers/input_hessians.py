"""Input second moments `H = Σ x xᵀ` of the quantizable layers, from one forward pass.

What GPTQ needs per layer. Positions a batch's `attention_mask` marks as padding are left out
(they are computed but never reach the output). Linear layers and ungrouped convolutions
(over their input patches) get one; embeddings and grouped convolutions do not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .capture import Call, capture_calls, conv_patches
from .layers import QuantTarget
from .tasks import Task

__all__ = ["call_hessian", "input_hessians"]


def _positions_mask(batch: Any, inp: Tensor) -> Tensor | None:
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if isinstance(mask, Tensor) and inp.dim() == 3 and tuple(mask.shape) == tuple(inp.shape[:2]):
        return mask.reshape(-1).to(torch.float32)
    return None


def input_hessians(
    model: nn.Module,
    batches: Sequence[Any],
    task: Task,
    targets: Sequence[QuantTarget],
    *,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[int, Tensor]:
    """Per target index (Linear, or Conv2d with groups=1), `H` `[cols, cols]` in float32."""
    report = progress or (lambda stage, done, total: None)
    sums: dict[int, Tensor] = {}
    with torch.no_grad():
        for b, batch in enumerate(batches):
            report("hessians", b, len(batches))
            with capture_calls(targets, batch, isolate=False) as calls:
                task.forward(model, batch)
            for call in calls:
                h = call_hessian(call, batch)
                if h is not None:
                    sums[call.target] = sums[call.target] + h if call.target in sums else h
    report("hessians", len(batches), len(batches))
    return {i: h.float() for i, h in sums.items()}


def call_hessian(call: Call, batch: Any) -> Tensor | None:
    """`Σ x xᵀ` (float64) over the positions of one call of a Linear or ungrouped Conv2d (padding
    left out); None for other modules."""
    mod = call.module
    if isinstance(mod, nn.Linear):
        x = call.inp.detach().reshape(-1, call.inp.shape[-1]).double()
        mask = _positions_mask(batch, call.inp)
        if mask is not None:
            x = x * mask.double().unsqueeze(1)
    elif isinstance(mod, nn.Conv2d) and mod.groups == 1:
        cols = conv_patches(mod, call.inp.detach().float())
        x = cols.transpose(1, 2).reshape(-1, cols.shape[1]).double()
    else:
        return None
    return x.T @ x
