"""Exact storage and compute cost of a choice for a layer.

No torch here: a solver-side process can price choices too.

Bytes are those of the packed format: per term, the codes of the whole `[rows, cols]` matrix
bit-packed into `ceil(rows * cols * bits / 8)` bytes, plus per group an fp16 scale (and an fp16
offset when asymmetric). Tied terms store their scale and zero point once; joint terms a scale
each and one zero point. A fractional extra
term stores its `k` rows the same way, plus a one-bit-per-row mask saying which rows they are.
Unquantized tensors cost 2 bytes per element (fp16). A rotated choice stores its column signs,
one bit per column. A llama.cpp block type (`Choice.ggml`) costs its blocks' bytes exactly
(`ggml.types.tensor_bytes`).

BOPs (bit operations) = MACs x weight bits x activation bits x terms, per sample; an extra
term on `k` of `rows` rows adds `k / rows` of a term. A rotated choice adds the online rotation
of its inputs: `log2(b)` additions of activation-bit numbers per input element (`b` the
Hadamard block, `profilers.quant.rotation`), counted for each layer even where layers share
an input and a runtime would rotate it once.
"""

from __future__ import annotations

import math

from ..types import FP_BITS, Choice, LayerSpec
from .ggml.types import GGML_TYPES, tensor_bytes

__all__ = ["FP_BYTES_PER_ELEMENT", "layer_bops", "layer_bytes", "n_groups", "weight_bytes"]

FP_BYTES_PER_ELEMENT = 2  # unquantized tensors are stored as fp16


def n_groups(cols: int, group_size: int | None) -> int:
    """Groups per row for `cols` elements (per channel when `group_size` is None)."""
    g = cols if group_size is None else min(group_size, cols)
    return math.ceil(cols / g)


def weight_bytes(rows: int, cols: int, choice: Choice) -> int:
    """Bytes to store a `[rows, cols]` weight under `choice`, metadata included.

    Example:
        >>> weight_bytes(384, 384, Choice(bits=4, group_size=64))  # 4 bits + 2x fp16 per 64
        82944
    """
    if not choice.quantized:
        return rows * cols * FP_BYTES_PER_ELEMENT
    if choice.ggml is not None:
        return tensor_bytes(rows, cols, GGML_TYPES[choice.ggml])
    meta = _meta_bytes(rows, cols, choice)
    codes = choice.terms * _code_bytes(rows, cols, choice.bits)
    signs = math.ceil(cols / 8) if choice.rotated else 0
    if choice.kind == "tied":  # one scale and zero point per group for all terms
        return codes + meta + signs
    if choice.kind == "joint":  # a scale per term, one (summed) zero point per group
        scale = rows * n_groups(cols, choice.group_size) * 2
        return codes + choice.terms * scale + (meta - scale) + signs
    total = codes + choice.terms * meta + signs
    if choice.extra:
        k = choice.extra_rows(rows)
        total += _code_bytes(k, cols, choice.bits) + _meta_bytes(k, cols, choice) + math.ceil(rows / 8)
    return total


def _code_bytes(rows: int, cols: int, bits: int) -> int:
    return math.ceil(rows * cols * bits / 8)


def _meta_bytes(rows: int, cols: int, choice: Choice) -> int:
    return rows * n_groups(cols, choice.group_size) * (2 if choice.symmetric else 4)


def layer_bytes(spec: LayerSpec, choice: Choice) -> int:
    """Bytes of a layer's weight under `choice` (a tied weight is stored, and counted, once)."""
    return weight_bytes(spec.rows, spec.cols, choice)


def layer_bops(spec: LayerSpec, choice: Choice, act_bits: int) -> int:
    """Bit operations per sample through this weight: MACs x weight bits x act bits x terms."""
    if not choice.quantized:
        return spec.macs * FP_BITS * act_bits
    per_term = spec.macs * choice.bits * act_bits
    extra = (per_term * choice.extra_rows(spec.rows)) // spec.rows if choice.extra else 0
    rotation = (spec.macs // spec.rows) * int(math.log2(spec.cols & -spec.cols)) * act_bits if choice.rotated else 0
    return per_term * choice.terms + extra + rotation
