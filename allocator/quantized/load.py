"""Loading a packed file back into a working model (`export` writes it).

Planned layers become packed modules (`modules`: `QuantLinear`, `QuantConv2d`,
`QuantEmbedding`, chosen by the FP module's type); every other tensor is loaded as stored.
Without a model to fill, the architecture is rebuilt from what the file records
(`allocator.sources.skeleton`): its parameters are allocated but never written before the
file's values replace them, so the skeleton costs address space, not resident memory.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from profilers.layers import resolve_modules
from profilers.types import Choice, ProfileError

from ..errors import ModelError, QuantizedFileError
from .export import FILE_FORMAT, FILE_VERSION, tensor_checksum
from .modules import PackedWeight, quantized_module
from .packing import unpack_bits

__all__ = ["load_quantized"]

_log = logging.getLogger(__name__)
_READABLE = ("1", FILE_VERSION)  # version 1 files have no checksums


def _rebuild(info: dict[str, Any], path: Path) -> nn.Module:
    from ..sources.models import skeleton

    try:
        return skeleton(info)
    except ModelError as e:
        raise QuantizedFileError(f"{path} cannot rebuild its model: {e}") from None


def load_quantized(
    path: str | os.PathLike[str],
    model: nn.Module | None = None,
    *,
    kernels: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    cache: bool = False,
) -> nn.Module:
    """Rebuild a working model from a packed file: planned Linear layers run on the CPU int4
    kernel (`KernelLinear`, the weight never expanded), the others become `QuantLinear`,
    `QuantConv2d` or `QuantEmbedding` dequantizing their packed weight when they run; the rest is
    loaded as stored. `allocator.quantized.kernels.kernel_report(model)` says which layer runs where.

    Args:
        path: a file written by `export_quantized`.
        model: the architecture to fill (any weights); None rebuilds it from the file.
        kernels: run Linear layers on the int4 kernel where it takes them; False keeps every
            layer dequantizing in float32 (the exact weights the plan measured).
        compute_dtype: the dtype the model computes in with `kernels`: the kernels' activations,
            and every float weight that is not packed (embeddings, norms, an unplanned head), so
            the model's outputs come in it too. bfloat16 (fast on x86 CPUs with AVX512-BF16 or
            AMX; SmolLM2's perplexity within 0.2% of the float32 path, measured in
            benchmarks/bench_runtime.py), or float32 (the kernel's slow exact path).
        cache: let dequantizing layers keep their weight after first use (faster, more memory).

    Raises:
        QuantizedFileError: the file is missing, corrupt, of another format, or does not fit
            the model.

    Example:
        >>> model = load_quantized("out/minilm.safetensors")  # doctest: +SKIP
    """
    p = Path(path)
    tensors, plan_map, info = _read(p)
    model = model if model is not None else _rebuild(info, p)
    used, satisfied = _install_planned(model, plan_map, tensors, p, cache)
    _load_rest(model, {k: v for k, v in tensors.items() if "::" not in k}, satisfied, p)
    leftover = [k for k in tensors if "::" in k and k not in used]
    if leftover:
        raise QuantizedFileError(f"{p} holds packed tensors its plan does not use: {leftover[:3]}")
    if kernels:
        from .kernels import kernel_report, run_in_dtype_, use_kernels

        use_kernels(model, compute_dtype)
        run_in_dtype_(model, compute_dtype)
        where = kernel_report(model)
        slow = {n: w for n, w in where.items() if not w.startswith("int4")}
        _log.info("%s: %d of %d packed layers on the int4 kernel%s", p, len(where) - len(slow), len(where),
                  f"; {', '.join(f'{n}: {w}' for n, w in list(slow.items())[:5])}" if slow else "")  # fmt: skip
    return model.eval()


def _read(p: Path) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """The file's tensors, its plan (`{layer: {choice, shape, aliases}}`) and its model record."""
    from safetensors import SafetensorError, safe_open

    if not p.is_file():
        raise QuantizedFileError(f"packed model file {p} does not exist")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FILE_FORMAT:
                raise QuantizedFileError(f"{p} is not an allocator packed model (no '{FILE_FORMAT}' metadata)")
            if meta.get("version") not in _READABLE:
                raise QuantizedFileError(
                    f"{p} has format version {meta.get('version')}; this allocator reads {', '.join(_READABLE)}"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
            if meta.get("version") != "1":
                _verify(tensors, meta.get("checksums", ""), p)
    except SafetensorError as e:
        raise QuantizedFileError(f"{p} is not a readable safetensors file ({e}); it may be truncated") from None
    except (OSError, ValueError) as e:
        raise QuantizedFileError(f"cannot read {p}: {e}") from None
    try:
        return tensors, json.loads(meta["plan"]), json.loads(meta.get("model", "{}"))
    except (KeyError, json.JSONDecodeError):
        raise QuantizedFileError(f"{p} has unreadable plan metadata") from None


def _verify(tensors: dict[str, Tensor], checksums: str, p: Path) -> None:
    """Every tensor against the checksum the file records for it."""
    names = sorted(tensors)
    if len(checksums) != 8 * len(names):
        raise QuantizedFileError(f"{p} records {len(checksums) // 8} checksums for {len(names)} tensors; it is damaged")
    for k, name in enumerate(names):
        if f"{tensor_checksum(tensors[name]):08x}" != checksums[8 * k : 8 * k + 8]:
            raise QuantizedFileError(f"{p}: tensor {name!r} fails its checksum; the file is damaged — export it again")


def _install_planned(
    model: nn.Module, plan_map: dict[str, Any], tensors: dict[str, Tensor], p: Path, cache: bool
) -> tuple[set[str], set[int]]:
    """Swap every planned layer for its packed module (fp16 layers take the stored weight).
    Returns the file keys used and the ids of the model tensors now provided."""
    try:
        modules = resolve_modules(model, plan_map)
        aliases = {n: resolve_modules(model, e.get("aliases", [])) for n, e in plan_map.items()}
    except ProfileError as e:
        raise QuantizedFileError(f"{p} does not fit the model: {e}") from None
    replaced: dict[int, nn.Module] = {}
    used: set[str] = set()
    satisfied: set[int] = set()
    for name, entry in plan_map.items():
        module, choice, shape = modules[name], Choice.parse(entry["choice"]), tuple(entry["shape"])
        if tuple(module.weight.shape) != shape:
            raise QuantizedFileError(f"{p}: layer {name!r} has shape {tuple(module.weight.shape)}, the file {shape}")
        satisfied.add(id(module.weight))
        if not choice.quantized:
            value = _take(tensors, f"{name}::weight", used, p).to(module.weight.dtype)
            if module.weight.is_meta:  # a skeleton on the meta device: take the file's tensor (aliases share it)
                param = nn.Parameter(value, requires_grad=False)
                for m in (module, *aliases[name].values()):
                    m.weight = param
                satisfied.add(id(param))
            else:
                with torch.no_grad():
                    module.weight.copy_(value)
            continue
        packed = _packed(tensors, name, choice, shape, used, p, cache)
        for m in (module, *aliases[name].values()):  # modules sharing the weight share the packed copy
            replaced[id(m)] = _quantized_module(m, packed, p)
    _swap_modules(model, replaced)
    return used, satisfied


def _load_rest(model: nn.Module, rest: dict[str, Tensor], satisfied: set[int], p: Path) -> None:
    """Load every unplanned tensor into the model, refusing a file that does not fit it."""
    state = model.state_dict(keep_vars=True)
    present = {id(state[k]) for k in rest if k in state} | satisfied
    missing = [k for k, t in state.items() if id(t) not in present and not _is_quantized_key(model, k)]
    unknown = [k for k in rest if k not in state]
    if missing or unknown:
        raise QuantizedFileError(
            f"{p} does not fit the model: missing {missing[:3]}, unexpected {unknown[:3]};"
            " use the model it was made for"
        )
    assign = {k: v.to(state[k].dtype) for k, v in rest.items() if state[k].is_meta}
    if assign:
        model.load_state_dict(assign, strict=False, assign=True)
    with torch.no_grad():
        for k, v in rest.items():
            if k not in assign:
                state[k].copy_(v.to(state[k].dtype))
    still_empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_empty:
        raise QuantizedFileError(f"{p} lacks tensors for {still_empty[:3]}; the file is incomplete")


def _take(tensors: dict[str, Tensor], key: str, used: set[str], path: Path) -> Tensor:
    if key not in tensors:
        raise QuantizedFileError(f"{path} lacks tensor {key!r}; the file is incomplete")
    used.add(key)
    return tensors[key]


def _packed(
    tensors: dict[str, Tensor],
    name: str,
    choice: Choice,
    shape: tuple[int, ...],
    used: set[str],
    path: Path,
    cache: bool,
) -> PackedWeight:
    rows = shape[0]
    cols = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    codes, scales, zeros = [], [], []
    for t in range(choice.terms):
        c = _take(tensors, f"{name}::t{t}.codes", used, path)
        if c.numel() != -(-rows * cols * choice.bits // 8):
            raise QuantizedFileError(f"{path}: {name} term {t} has {c.numel()} code bytes, expected more or fewer")
        codes.append(c)
        if choice.kind == "tied" and t:
            continue
        scales.append(_take(tensors, f"{name}::t{t}.scale", used, path))
        zero_key = f"{name}::t{t}.zero"
        zeros.append(_take(tensors, zero_key, used, path) if zero_key in tensors else None)
    extra = None
    if choice.extra:
        mask = unpack_bits(_take(tensors, f"{name}::x.rows", used, path), 1, rows).to(torch.bool)
        extra_rows = torch.nonzero(mask).squeeze(1)
        if extra_rows.numel() != choice.extra_rows(rows):
            raise QuantizedFileError(f"{path}: {name} marks {extra_rows.numel()} extra-term rows for {choice.label}")
        zero_key = f"{name}::x.zero"
        extra = (
            extra_rows,
            _take(tensors, f"{name}::x.codes", used, path),
            _take(tensors, f"{name}::x.scale", used, path),
            _take(tensors, zero_key, used, path) if zero_key in tensors else None,
        )
    signs = None
    if choice.rotated:
        signs = unpack_bits(_take(tensors, f"{name}::r.signs", used, path), 1, cols).float() * 2 - 1
    return PackedWeight(shape, choice, codes, scales, zeros, extra, signs=signs, cache=cache)


def _quantized_module(module: nn.Module, packed: PackedWeight, path: Path) -> nn.Module:
    try:
        return quantized_module(module, packed)
    except (TypeError, ValueError) as e:
        raise QuantizedFileError(f"{path}: {e}") from None


def _swap_modules(model: nn.Module, replaced: dict[int, nn.Module]) -> None:
    for parent in model.modules():
        for child_name, child in list(parent.named_children()):
            if id(child) in replaced:
                setattr(parent, child_name, replaced[id(child)])


def _is_quantized_key(model: nn.Module, key: str) -> bool:
    owner, _, _ = key.rpartition(".")
    return isinstance(dict(model.named_modules(remove_duplicate=False)).get(owner), PackedWeight)
