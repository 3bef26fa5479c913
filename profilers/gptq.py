"""GPTQ: quantization with second-order error feedback (Frantar et al., 2022), for every term.

For a layer with inputs `X` and `H = XᵀX` (plus 1% damping), columns are quantized left to
right; each column's rounding error, divided by the diagonal of the inverse Hessian's Cholesky
factor, is fed back into the columns not yet quantized, so that `‖(W − Ŵ)X‖` and not `‖W − Ŵ‖`
is what the rounding minimises. Group scales are chosen (by the same clipping search as
round-to-nearest) on the error-updated weights when a group is reached.

Multi-term choices:

- residual: term 1 is GPTQ on `W`; term t is GPTQ on what the terms before left, with the same
  `H` (each pass minimises the output error of what is left);
- tied: GPTQ on the combined `bits·terms` grid, then split into digits (exactly as RTN);
- joint: the residual GPTQ terms, their zero points merged into term 1 (the weight-space
  least-squares refinement of `joint` would undo the output-space feedback, so it is not run).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .quantize import Term, _quantize, split_digits
from .specs import Choice

__all__ = ["gptq_reconstructions", "gptq_terms", "prepare_hessian"]


def prepare_hessian(h: Tensor, *, damp: float = 0.01) -> tuple[Tensor, Tensor]:
    """Damped `H` → (upper Cholesky factor of `H⁻¹`, dead-column mask). Columns no input ever
    reached (zero diagonal) are marked dead: their weights do not matter to the output."""
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += torch.eye(h.shape[0], dtype=h.dtype) * damp * torch.diag(h).mean()
    chol = torch.linalg.cholesky(h)
    inv = torch.cholesky_inverse(chol)
    return torch.linalg.cholesky(inv, upper=True).float(), dead


def _gptq_pass(
    w: Tensor, hinv_u: Tensor, dead: Tensor, *, bits: int, group_size: int | None, symmetric: bool, block: int = 128
) -> Term:
    """One GPTQ pass quantizing `w` `[rows, cols]`; returns its term (codes, scales, zeros)."""
    w = w.clone().float()
    w[:, dead] = 0.0
    rows, cols = w.shape
    g = cols if group_size is None else min(group_size, cols)
    n_groups = -(-cols // g)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    codes = torch.zeros(rows, cols, dtype=torch.int32)
    scales = torch.zeros(rows, n_groups, dtype=torch.float16)
    zeros = None if symmetric else torch.zeros(rows, n_groups, dtype=torch.float16)
    if g < cols:  # blocks of whole groups: a group's columns are all updated before it starts
        block = g * max(1, block // g)
    scale = offset = None
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        w1 = w[:, start:stop].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv_u[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            if col % g == 0:
                # Group parameters from the error-updated weights of the whole group (per
                # channel: the untouched row, at column 0).
                grp = w1[:, i : i + g] if g < cols else w[:, :]
                term, _ = _quantize(grp, bits=bits, group_size=None, symmetric=symmetric, clip=None)
                scale = term.scale[:, 0].float()
                offset = None if term.offset is None else term.offset[:, 0].float()
                scales[:, col // g] = term.scale[:, 0]
                if zeros is not None and term.offset is not None:
                    zeros[:, col // g] = term.offset[:, 0]
            x = w1[:, i]
            q = (x - offset) / scale if offset is not None else x / scale
            q = q.round().clamp(qmin, qmax)
            codes[:, col] = q.to(torch.int32)
            xq = q * scale + offset if offset is not None else q * scale
            e = (x - xq) / h1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, stop:] -= err1 @ hinv_u[start:stop, stop:]
    code_type = torch.int32 if bits > 8 else torch.int8 if symmetric else torch.uint8
    return Term(codes.to(code_type), scales, zeros, bits, g)


def _reconstruct(term: Term) -> Tensor:
    from .quantize import dequantize

    return dequantize(term)


def gptq_terms(w2d: Tensor, h: Tensor, choice: Choice, *, damp: float = 0.01) -> list[Term]:
    """The whole terms of `choice` for `w2d` `[rows, cols]` under GPTQ with `H` `[cols, cols]`."""
    hinv_u, dead = prepare_hessian(h, damp=damp)
    w = w2d.detach().float()
    if choice.kind == "tied":
        bits = choice.bits * choice.terms
        full = _gptq_pass(w, hinv_u, dead, bits=bits, group_size=choice.group_size, symmetric=False)
        return split_digits(full, choice.bits, choice.terms)
    terms: list[Term] = []
    residual = w
    for _ in range(choice.terms):
        term = _gptq_pass(
            residual, hinv_u, dead, bits=choice.bits, group_size=choice.group_size, symmetric=choice.symmetric
        )
        terms.append(term)
        residual = residual - _reconstruct(term)
    if choice.kind == "joint" and not choice.symmetric:
        merged = sum(t.offset.float() for t in terms if t.offset is not None)
        terms = [
            Term(t.codes, t.scale, merged.half() if k == 0 else None, t.bits, t.group_size) for k, t in enumerate(terms)
        ]
    return terms


def _batched_pass(
    targets: list[Tensor], configs: list[tuple[int, int | None, bool]], hinv_u: Tensor, dead: Tensor, block: int = 128
) -> list[Tensor]:
    """GPTQ for several (matrix, bits, group, symmetric) at once, sharing one column sweep.

    All matrices have the same columns (one layer's weight, or residuals of it); their rows are
    stacked, each row quantized with its own bits and group parameters. Returns each one's
    reconstruction (float32).
    """
    rows = targets[0].shape[0]
    cols = targets[0].shape[1]
    w = torch.cat([t.float() for t in targets]).clone()
    w[:, dead] = 0.0
    k = len(configs)
    groups = [cols if g is None else min(g, cols) for _, g, _ in configs]
    qmin = torch.cat([torch.full((rows,), float(-(2 ** (b - 1)) if s else 0)) for b, _, s in configs])
    qmax = torch.cat([torch.full((rows,), float(2 ** (b - 1) - 1 if s else 2**b - 1)) for b, _, s in configs])
    has_zero = torch.cat([torch.full((rows,), not s) for _, _, s in configs])
    scale = torch.ones(k * rows)
    offset = torch.zeros(k * rows)
    recon = torch.zeros_like(w)
    # Blocks of whole groups for every group size: their least common multiple, at least `block`.
    step = 1
    for g in set(groups):
        if g < cols:
            step = step * g // _gcd(step, g)
    block = step * max(1, block // step) if step > 1 else block
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        w1 = w[:, start:stop].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv_u[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            for c, (bits, _, sym) in enumerate(configs):
                g = groups[c]
                if col % g:
                    continue
                sl = slice(c * rows, (c + 1) * rows)
                grp = w1[sl, i : i + g] if g < cols else w[sl, :]
                term, _ = _quantize(grp, bits=bits, group_size=None, symmetric=sym, clip=None)
                scale[sl] = term.scale[:, 0].float()
                if term.offset is not None:
                    offset[sl] = term.offset[:, 0].float()
            x = w1[:, i]
            q = torch.where(has_zero, (x - offset) / scale, x / scale).round().clamp(qmin, qmax)
            xq = torch.where(has_zero, q * scale + offset, q * scale)
            recon[:, col] = xq
            e = (x - xq) / h1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, stop:] -= err1 @ hinv_u[start:stop, stop:]
    return list(recon.split(rows))


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def gptq_reconstructions(w2d: Tensor, h: Tensor, choices: list[Choice], *, damp: float = 0.01) -> list[Tensor]:
    """GPTQ reconstructions of `w2d` for many whole-term choices, with one column sweep per term
    index (all first terms together, then all second terms, ...)."""
    hinv_u, dead = prepare_hessian(h, damp=damp)
    w = w2d.detach().float()
    out: list[Tensor | None] = [None] * len(choices)
    total = [torch.zeros_like(w) for _ in choices]
    # Joint terms merge their zero points in fp16 (as stored): done one by one.
    depth = [0 if c.kind == "joint" else 1 if c.kind == "tied" else c.terms for c in choices]
    for t in range(max(depth)):
        live = [i for i, c in enumerate(choices) if c.quantized and depth[i] > t]
        if not live:
            break
        configs = []
        for i in live:
            c = choices[i]
            bits = c.bits * c.terms if c.kind == "tied" else c.bits
            configs.append((bits, c.group_size, c.symmetric and c.kind != "tied"))
        recs = _batched_pass([w - total[i] for i in live], configs, hinv_u, dead)
        for i, rec in zip(live, recs, strict=True):
            total[i] = total[i] + rec
    for i, c in enumerate(choices):
        if not c.quantized:
            out[i] = w.half().float()
        elif c.kind == "joint":
            from .quantize import dequantize_terms

            out[i] = dequantize_terms(gptq_terms(w, h, c, damp=damp))
        else:
            out[i] = total[i]
    return out  # type: ignore[return-value]
