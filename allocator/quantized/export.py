"""The packed file: a quantized model as one safetensors file (`load` reads it back).

Layout (format `allocator.quantized`, version 2):

- per planned layer `L`, per term `t`: `L::t{t}.codes` (uint8, bit-packed, `packing`),
  `L::t{t}.scale` and, when asymmetric, `L::t{t}.zero` (fp16, `[rows, groups]`); tied terms
  store scale and zero for term 0 only;
- a fractional extra term: `L::x.codes`, `L::x.scale`, `L::x.zero` for its rows, and
  `L::x.rows` (bit mask of the rows, packed one bit per row);
- a rotated choice (`int3-g64-had`): `L::r.signs`, the rotation's column signs, one bit per
  column (1 = +1); the terms hold `W R` (`profilers.quant.rotation`);
- an fp16 layer: `L::weight`;
- every other tensor of the model's state dict under its own name, floats in fp16;
- metadata: the format and version, the plan (`{layer: choice}`), how to rebuild the
  architecture (a transformers config, or nothing: then pass `model=` to `load_quantized`), and
  a CRC-32 of every tensor's bytes (`checksums`: 8 hex digits per tensor, in sorted name order),
  which loading verifies, so a damaged file is refused naming the damaged tensor.

The payload is exactly what the cost model priced; the header (tensor index and metadata) is
covered by `ProfileTable.file_overhead`, reserved from the byte budget.
"""

from __future__ import annotations

import copy
import json
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from profilers.files import atomic_write_bytes
from profilers.quant.quantize import Term
from profilers.quant.rotation import rotation_signs
from profilers.resident import held, state_with_owners
from profilers.tasks import Task
from profilers.types import ProfileTable

from ..errors import PlanError
from ..planning.plan import Plan
from .apply import quantize_plan_
from .checks import check_plan_fits_model
from .packing import pack_bits
from .stored import StoredLayer

__all__ = ["FILE_FORMAT", "FILE_VERSION", "export_quantized", "header_allowance", "tensor_checksum"]

FILE_FORMAT = "allocator.quantized"
FILE_VERSION = "2"  # 2: per-tensor checksums (1 is read too, unchecked)
# Header bytes per tensor entry beyond its name: '"<name>":{"dtype":"F16","shape":[30522,6],
# "data_offsets":[12345678,12345678]},' is about 70; 88 leaves room for longer shapes and offsets;
# 8 more hold its checksum.
_ENTRY = 88 + 8
_METADATA = 8192  # the model's config and the fixed metadata keys, beyond the per-layer plan entries


def header_allowance(model: nn.Module, table: ProfileTable) -> int:
    """An upper bound on the header bytes of any packed file of `model` planned from `table`."""
    total = _METADATA
    planned = set()
    for layer in table.layers:
        for mod in layer.spec.modules:
            planned.add(f"{mod}.weight")
        widest = max((o.choice.terms + (1 if o.choice.extra else 0) for o in layer.options), default=1)
        entries = 3 * widest + 2  # codes, scale, zero per term; the row mask; the fp16 weight
        total += entries * (len(layer.spec.name) + 12 + _ENTRY) + len(layer.spec.name) + 48
    for name in model.state_dict():
        if name not in planned:
            total += len(name) + _ENTRY
    return total


def _pack_term(term: Term, bits: int, symmetric: bool) -> Tensor:
    codes = term.codes.to(torch.int64)
    if symmetric:
        codes = codes + (1 << (bits - 1))
    return pack_bits(codes, bits)


def export_quantized(
    model: nn.Module,
    plan: Plan,
    path: str | os.PathLike[str],
    *,
    rebuild: dict[str, Any] | None = None,
    hessians: dict[str, Tensor] | None = None,
    calibration: Sequence[Any] | None = None,
    task: Task | None = None,
    stored: dict[str, StoredLayer] | None = None,
) -> Path:
    """Quantize `model` as `plan` says and write the packed file (atomically). The model is
    not changed.

    Args:
        model: the FP model the plan was made for.
        plan: the plan.
        path: the file to write.
        rebuild: how to rebuild the architecture (`LoadedModel.rebuild`); without it,
            `load_quantized` needs the skeleton passed in.
        hessians: every layer's `H`, for a plan scored for GPTQ (`apply.layer_hessians`).
        calibration, task: or the calibration batches to compute them from, as `apply_plan_`
            (block by block; sequentially when `plan.sequential`; then block reconstruction when
            `plan.refine_steps`).
        stored: what `quantize_plan_` already made for this plan (nothing is quantized again).

    Raises:
        PlanError: the plan does not fit the model, or is a GGUF plan (`gguf_export.export_gguf`).
    """
    if plan.target_format == "gguf":
        raise PlanError("this plan takes llama.cpp block types: write it as a GGUF file (allocator apply -o x.gguf)")
    modules = check_plan_fits_model(model, plan)
    planned = {id(modules[name].weight) for name in plan.layers}
    if stored is None:
        # Quantizing writes each layer as it goes (sequential calibration and block reconstruction
        # read the blocks before as quantized), so it runs on a copy: the model is not changed.
        work = copy.deepcopy(model)
        stored = quantize_plan_(work, plan, hessians=hessians, calibration=calibration, task=task).layers
        del work
    elif set(stored) != set(plan.layers):
        raise PlanError("the stored layers given to export_quantized are not the plan's layers")
    per_layer = {name: _layer_tensors(name, stored[name]) for name in plan.layers}
    tensors = {k: v for name in plan.layers for k, v in per_layer[name].items()}  # the plan's order
    tensors.update(_unplanned_tensors(model, planned))
    metadata = {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "plan": json.dumps(
            {
                n: {"choice": lp.choice.label, "shape": list(lp.shape), "aliases": list(lp.aliases)}
                for n, lp in plan.layers.items()
            }
        ),
        "model": json.dumps(rebuild or {}),
        "model_fingerprint": plan.model_fingerprint,
        "predicted_bytes": str(plan.predicted.bytes),
        "checksums": "".join(f"{tensor_checksum(tensors[k]):08x}" for k in sorted(tensors)),
    }
    from safetensors.torch import save

    return atomic_write_bytes(path, save(tensors, metadata=metadata))


def _layer_tensors(name: str, layer: StoredLayer) -> dict[str, Tensor]:
    """The stored tensors of one planned layer: packed codes, scales and zero points per term,
    and its extra term's rows; or its fp16 weight."""
    c = layer.choice
    if layer.fp16 is not None:
        return {f"{name}::weight": layer.fp16.contiguous()}
    out: dict[str, Tensor] = {}
    for t, term in enumerate(layer.terms):
        out[f"{name}::t{t}.codes"] = _pack_term(term, c.bits, c.symmetric)
        if c.kind == "tied" and t:
            continue  # tied terms share term 0's scale and zero point
        out[f"{name}::t{t}.scale"] = term.scale.contiguous()
        if term.offset is not None:
            out[f"{name}::t{t}.zero"] = term.offset.contiguous()
    if c.rotated:  # the terms hold W R; loading brings them back with the same signs
        out[f"{name}::r.signs"] = pack_bits((rotation_signs(layer.matrix_shape[1]) > 0).to(torch.int64), 1)
    if layer.extra is not None:
        extra = layer.extra[-1]
        mask = torch.zeros(layer.shape[0], dtype=torch.int64)
        mask[layer.rows] = 1
        out[f"{name}::x.codes"] = _pack_term(extra, c.bits, c.symmetric)
        out[f"{name}::x.scale"] = extra.scale.contiguous()
        if extra.offset is not None:
            out[f"{name}::x.zero"] = extra.offset.contiguous()
        out[f"{name}::x.rows"] = pack_bits(mask, 1)
    return out


def tensor_checksum(t: Tensor) -> int:
    """CRC-32 of a tensor's bytes as stored (contiguous, little-endian)."""
    return zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _unplanned_tensors(model: nn.Module, planned: set[int]) -> dict[str, Tensor]:
    """Every state-dict tensor of `model` the plan does not quantize, each stored once, as the
    file stores it (floats in fp16); a block read on use is read for it, one block at a time."""
    out: dict[str, Tensor] = {}
    seen = set(planned)
    for key, t, owner in state_with_owners(model):
        if id(t) not in seen:
            seen.add(id(t))
            with held(owner):
                value = t.detach()
                out[key] = (value.half() if value.is_floating_point() else value).contiguous()
    return out
