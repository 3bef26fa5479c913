"""Per-sample weight gradients `G_s = dL_s/dW` of a layer's calls, and their products with the
layer's stack of quantization errors: `a[s, c] = ⟨ΔW_c, G_s⟩`, whole and per row (the first-order
terms `FisherProfiler` squares; see `fisher`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..capture import Call, conv_patches
from ..quant.rounding import error_stack
from ..types import Choice

__all__ = ["RowErrors", "dense_products", "embedding_products", "output_rows", "per_sample_weight_grads"]

# Per-sample weight gradients are built in chunks of at most this many elements.
MAX_CHUNK_ELEMENTS = 1 << 25


def per_sample_weight_grads(call: Call, g: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
    """`G[s] = dL_s/dW` as `[n, rows, cols]` for samples `start:stop` of a Linear/Conv2d call."""
    mod = call.module
    g = g[start:stop].float()
    x = call.inp[start:stop].detach().float()
    n = g.shape[0]
    if isinstance(mod, nn.Conv2d):
        cols = conv_patches(mod, x)
        length = cols.shape[-1]
        if mod.groups == 1:
            return torch.bmm(g.reshape(n, mod.out_channels, length), cols.transpose(1, 2))
        gg = g.reshape(n, mod.groups, mod.out_channels // mod.groups, length)
        cc = cols.reshape(n, mod.groups, -1, length)
        return torch.einsum("ngol,ngil->ngoi", gg, cc).reshape(n, mod.out_channels, -1)
    x3 = x.reshape(n, -1, x.shape[-1])
    g3 = g.reshape(n, -1, g.shape[-1])
    return torch.bmm(g3.transpose(1, 2), x3)


def _products(grad_w: Tensor, stack: Tensor, n_paired: int) -> tuple[Tensor, Tensor | None]:
    """`a [b, K]` = `⟨ΔW_k, G_b⟩`, and per row `[b, n_paired, rows]` for the first `n_paired`
    stack rows (the ones fractional options mix), from per-sample gradients `grad_w [b, rows, cols]`."""
    b = grad_w.shape[0]
    if not n_paired:
        return grad_w.reshape(b, -1) @ stack.reshape(stack.shape[0], -1).T, None
    per_row = torch.einsum("boi,koi->bko", grad_w, stack[:n_paired])
    a = per_row.sum(dim=-1)
    if n_paired < stack.shape[0]:
        rest = grad_w.reshape(b, -1) @ stack[n_paired:].reshape(stack.shape[0] - n_paired, -1).T
        a = torch.cat([a, rest], dim=1)
    return a, per_row


def dense_products(call: Call, g: Tensor, stack: Tensor, n_paired: int) -> tuple[Tensor, Tensor | None]:
    """`_products` for a Linear/Conv call with output-gradient `g`, in chunks of samples."""
    n = g.shape[0]
    chunk = max(1, MAX_CHUNK_ELEMENTS // max(1, stack.shape[1] * stack.shape[2]))
    parts = [_products(per_sample_weight_grads(call, g, i, i + chunk), stack, n_paired) for i in range(0, n, chunk)]
    if len(parts) == 1:
        return parts[0]
    per_row = torch.cat([p[1] for p in parts]) if n_paired else None
    return torch.cat([p[0] for p in parts]), per_row


def embedding_products(
    call: Call, g: Tensor, rows: Tensor, stack: Tensor, n_paired: int
) -> tuple[Tensor, Tensor | None]:
    """`_products` for an embedding lookup; `rows` are the sorted rows of `stack [K, U, dim]`
    (ids outside `rows` are left out)."""
    n = g.shape[0]
    dim = g.shape[-1]
    ids = call.inp.reshape(n, -1).contiguous()
    local = torch.searchsorted(rows, ids).clamp_max(rows.numel() - 1)
    hit = (rows[local] == ids).reshape(-1)
    flat = (torch.arange(n, device=local.device).unsqueeze(1) * rows.numel() + local).reshape(-1)
    grad_rows = torch.zeros(n * rows.numel(), dim, dtype=torch.float32, device=g.device)
    grad_rows.index_add_(0, flat[hit], g.float().reshape(-1, dim)[hit])
    return _products(grad_rows.reshape(n, rows.numel(), dim), stack, n_paired)


def output_rows(call: Call, g: Tensor, rows: slice) -> Tensor:
    """The part of a Linear/Conv2d output-gradient that belongs to weight rows `rows`."""
    return g[:, rows] if isinstance(call.module, nn.Conv2d) else g[..., rows]


class RowErrors:
    """Quantization errors of an embedding's rows, computed once per row as batches look them up."""

    def __init__(self, weight: Tensor, stack: list[Choice]) -> None:
        self.weight = weight
        self.stack = stack
        self.slot = torch.full((weight.shape[0],), -1, dtype=torch.long)
        self.errors = torch.empty(len(stack), 0, weight.shape[1])

    def get(self, rows: Tensor) -> Tensor:
        """`[K, len(rows), dim]` errors of the sorted `rows`."""
        missing = rows[self.slot[rows] < 0]
        if missing.numel():
            self.slot[missing] = torch.arange(missing.numel()) + self.errors.shape[1]
            new = error_stack(self.weight.detach()[missing], self.stack)
            self.errors = torch.cat([self.errors, new], dim=1)
        return self.errors[:, self.slot[rows]]
