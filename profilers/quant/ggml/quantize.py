"""A matrix in llama.cpp block types: grids fitted to the weights and `H`, codes rounded onto
them to nearest (`rtn`) or by GPTQ with error feedback (`gptq`; `gptq-act`: in activation order).

The blocks of every type run along the input columns, so their groups are contiguous in the
original column order whatever order GPTQ sweeps the columns in: the grid is fixed before the
sweep (static groups), from the weights and the importance `diag(H)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..gptq import gptq_static, prepare_hessian
from ..options import needs_hessian
from .fit import GgmlTensor, fit_grid, round_to_grid
from .types import GgmlType

__all__ = ["quantize_ggml"]


def quantize_ggml(
    w2d: Tensor,
    types: Sequence[GgmlType],
    *,
    method: str = "rtn",
    hessian: Tensor | None = None,
    damp: float = 0.01,
) -> list[GgmlTensor]:
    """`w2d` `[rows, cols]` stored in each of `types`, from one GPTQ sweep for all of them.

    Args:
        w2d: the matrix; every type must fit its rows (`GgmlType.fits`).
        types: the block types.
        method: `rtn`, `gptq` or `gptq-act`; GPTQ only where `hessian` is given.
        hessian: the layer's input second moment `H` `[cols, cols]`; its diagonal weighs each
            column's error when the grids are fitted.
        damp: GPTQ's dampening, as a share of `H`'s mean diagonal.
    """
    w = w2d.detach().float()
    importance = None if hessian is None else torch.diag(hessian).float()
    grids = [fit_grid(w, t, importance) for t in types]
    if hessian is None or not needs_hessian(method):
        return [round_to_grid(w, g) for g in grids]
    order = torch.argsort(torch.diag(hessian), descending=True, stable=True) if method == "gptq-act" else None
    h = hessian if order is None else hessian[order][:, order]
    hinv_u, dead = prepare_hessian(h, damp=damp)
    codes = gptq_static([w] * len(grids), [g.static() for g in grids], hinv_u, dead, order=order)
    return [GgmlTensor(g, c) for g, c in zip(grids, codes, strict=True)]
