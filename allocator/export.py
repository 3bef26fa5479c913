"""The packed file: a quantized model as one safetensors file, and loading it back.

Layout (format `allocator.quantized`, version 1):

- per planned layer `L`, per term `t`: `L::t{t}.codes` (uint8, bit-packed, `packing`),
  `L::t{t}.scale` and, when asymmetric, `L::t{t}.zero` (fp16, `[rows, groups]`); tied terms
  store scale and zero for term 0 only;
- a fractional extra term: `L::x.codes`, `L::x.scale`, `L::x.zero` for its rows, and
  `L::x.rows` (bit mask of the rows, packed one bit per row);
- an fp16 layer: `L::weight`;
- every other tensor of the model under its own name, floats in fp16;
- metadata: the format and version, the plan (`{layer: choice}`), and how to rebuild the
  architecture (a transformers config, or nothing: then pass `model=` to `load_quantized`).

The payload is exactly what the cost model priced; the header (tensor index and metadata) is
covered by `ProfileTable.file_overhead`, reserved from the byte budget.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from profilers.files import atomic_write_bytes
from profilers.layers import resolve_modules
from profilers.methods import layer_terms
from profilers.quantize import Term, as_matrix
from profilers.specs import ProfileError, ProfileTable
from profilers.tasks import Task

from .apply import check_plan_fits_model, plan_hessians
from .errors import AllocatorError
from .packing import pack_bits, unpack_bits
from .plan import Plan
from .qmodules import PackedWeight, QuantConv2d, QuantEmbedding, QuantLinear

__all__ = ["FILE_FORMAT", "QuantizedFileError", "export_quantized", "header_allowance", "load_quantized"]

FILE_FORMAT = "allocator.quantized"
FILE_VERSION = "1"
# Header bytes per tensor entry beyond its name: '"<name>":{"dtype":"F16","shape":[30522,6],
# "data_offsets":[12345678,12345678]},' is about 70; 88 leaves room for longer shapes and offsets.
_ENTRY = 88
_METADATA = 8192  # the model's config and the fixed metadata keys, beyond the per-layer plan entries


class QuantizedFileError(AllocatorError):
    """A packed file cannot be read or does not describe a quantized model."""


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
        calibration, task: or the calibration batches to compute them from, as `apply_plan_`.

    Raises:
        PlanError: the plan does not fit the model.
    """
    modules = check_plan_fits_model(model, plan)
    hessians = plan_hessians(model, plan, hessians, calibration, task)
    tensors: dict[str, Tensor] = {}
    planned: set[int] = set()
    for name, lp in plan.layers.items():
        weight = modules[name].weight.detach()
        planned.add(id(modules[name].weight))
        c = lp.choice
        if not c.quantized:
            tensors[f"{name}::weight"] = weight.half().contiguous()
            continue
        w2d = as_matrix(weight).float()
        h = (hessians or {}).get(name)
        terms = layer_terms(w2d, c.base, method=plan.method, hessian=h)
        for t, term in enumerate(terms):
            tensors[f"{name}::t{t}.codes"] = _pack_term(term, c.bits, c.symmetric)
            if c.kind == "tied" and t:
                continue  # tied terms share term 0's scale and zero point
            tensors[f"{name}::t{t}.scale"] = term.scale.contiguous()
            if term.offset is not None:
                tensors[f"{name}::t{t}.zero"] = term.offset.contiguous()
        if c.extra:
            rows = torch.as_tensor(lp.rows_with_extra_term(), dtype=torch.long)
            extra = layer_terms(w2d[rows], c.next_term, method=plan.method, hessian=h)[-1]
            mask = torch.zeros(w2d.shape[0], dtype=torch.int64)
            mask[rows] = 1
            tensors[f"{name}::x.codes"] = _pack_term(extra, c.bits, c.symmetric)
            tensors[f"{name}::x.scale"] = extra.scale.contiguous()
            if extra.offset is not None:
                tensors[f"{name}::x.zero"] = extra.offset.contiguous()
            tensors[f"{name}::x.rows"] = pack_bits(mask, 1)
    seen = set()
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) in planned or id(t) in seen:
            continue
        seen.add(id(t))
        value = t.detach()
        tensors[key] = (value.half() if value.is_floating_point() else value).contiguous()
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
    }
    from safetensors.torch import save

    return atomic_write_bytes(path, save(tensors, metadata=metadata))


def _rebuild(info: dict[str, Any], path: Path) -> nn.Module:
    if info.get("source") == "builtin":
        from .zoo import SKELETONS

        make = SKELETONS.get(info.get("name", ""))
        if make is None:
            raise QuantizedFileError(f"{path} names an unknown built-in model {info.get('name')!r}")
        with _parameters_on_meta():
            return make().eval()
    if info.get("source") in ("import", "torch.save"):
        # the architecture lives outside the file: the same import path, or the same saved module
        from . import sources
        from .errors import ModelError

        try:
            if info["source"] == "import":
                return sources.import_model(str(info.get("target", "")))
            return sources.load_saved_module(Path(str(info.get("path", ""))))
        except ModelError as e:
            raise QuantizedFileError(f"{path} rebuilds its model from outside the file, which failed: {e}") from None
    if info.get("source") != "transformers":
        raise QuantizedFileError(f"{path} does not say how to rebuild its model; pass model= to load_quantized")
    import transformers

    config_dict = dict(info["config"])
    model_type = config_dict.pop("model_type", None)
    if not model_type:
        raise QuantizedFileError(f"{path} has a model config without model_type")
    config = transformers.AutoConfig.for_model(model_type, **config_dict)
    auto = getattr(transformers, info.get("auto_class", "AutoModel"), None)
    if auto is None:
        raise QuantizedFileError(f"{path} names an unknown transformers class {info.get('auto_class')!r}")
    # The skeleton's parameters live on the meta device (no memory): packed layers replace them
    # and the file provides the rest. Buffers stay real: non-persistent ones (position ids) are
    # not in the file and keep the values the constructor gave them.
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    with no_init_weights(), _parameters_on_meta():
        return auto.from_config(config, **info.get("init", {})).eval()


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def load_quantized(path: str | os.PathLike[str], model: nn.Module | None = None, *, cache: bool = False) -> nn.Module:
    """Rebuild a working model from a packed file: planned layers become `QuantLinear`,
    `QuantConv2d` or `QuantEmbedding` holding their packed weight; the rest is loaded as stored.

    Args:
        path: a file written by `export_quantized`.
        model: the architecture to fill (any weights); None rebuilds it from the file.
        cache: let quantized layers keep their dequantized weight after first use (faster,
            more memory).

    Raises:
        QuantizedFileError: the file is missing, corrupt, of another format, or does not fit
            the model.

    Example:
        >>> model = load_quantized("out/minilm.safetensors")  # doctest: +SKIP
    """
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise QuantizedFileError(f"packed model file {p} does not exist")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FILE_FORMAT:
                raise QuantizedFileError(f"{p} is not an allocator packed model (no '{FILE_FORMAT}' metadata)")
            if meta.get("version") != FILE_VERSION:
                raise QuantizedFileError(
                    f"{p} has format version {meta.get('version')}; this allocator reads {FILE_VERSION}"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except SafetensorError as e:
        raise QuantizedFileError(f"{p} is not a readable safetensors file ({e}); it may be truncated") from None
    except (OSError, ValueError) as e:
        raise QuantizedFileError(f"cannot read {p}: {e}") from None
    try:
        plan_map = json.loads(meta["plan"])
        info = json.loads(meta.get("model", "{}"))
    except (KeyError, json.JSONDecodeError):
        raise QuantizedFileError(f"{p} has unreadable plan metadata") from None
    model = model if model is not None else _rebuild(info, p)

    from profilers.specs import Choice

    try:
        modules = resolve_modules(model, plan_map)
        aliases = {n: resolve_modules(model, e.get("aliases", [])) for n, e in plan_map.items()}
    except ProfileError as e:
        raise QuantizedFileError(f"{p} does not fit the model: {e}") from None
    replaced: dict[int, nn.Module] = {}
    used: set[str] = set()
    satisfied: set[int] = set()  # skeleton tensors the packed layers provide
    for name, entry in plan_map.items():
        module = modules[name]
        choice = Choice.parse(entry["choice"])
        shape = tuple(entry["shape"])
        if tuple(module.weight.shape) != shape:
            raise QuantizedFileError(f"{p}: layer {name!r} has shape {tuple(module.weight.shape)}, the file {shape}")
        satisfied.add(id(module.weight))
        if not choice.quantized:
            value = _take(tensors, f"{name}::weight", used, p).to(module.weight.dtype)
            if module.weight.is_meta:  # a rebuilt skeleton: take the file's tensor (aliases share it)
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
            replaced[id(m)] = _quantized_module(m, packed)
    _swap_modules(model, replaced)
    rest = {k: v for k, v in tensors.items() if "::" not in k}
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
    leftover = [k for k in tensors if "::" in k and k not in used]
    if leftover:
        raise QuantizedFileError(f"{p} holds packed tensors its plan does not use: {leftover[:3]}")
    return model.eval()


def _take(tensors: dict[str, Tensor], key: str, used: set[str], path: Path) -> Tensor:
    if key not in tensors:
        raise QuantizedFileError(f"{path} lacks tensor {key!r}; the file is incomplete")
    used.add(key)
    return tensors[key]


def _packed(
    tensors: dict[str, Tensor], name: str, choice: Any, shape: tuple[int, ...], used: set[str], path: Path, cache: bool
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
    return PackedWeight(shape, choice, codes, scales, zeros, extra, cache=cache)


def _quantized_module(module: nn.Module, packed: PackedWeight) -> nn.Module:
    bias = getattr(module, "bias", None)
    bias = None if bias is None else bias.detach().clone()
    if isinstance(module, nn.Linear):
        return QuantLinear(module.in_features, module.out_features, packed, bias)
    if isinstance(module, nn.Conv2d):
        return QuantConv2d(module, packed, bias)
    if isinstance(module, nn.Embedding):
        return QuantEmbedding(module, packed)
    raise QuantizedFileError(f"cannot store a {type(module).__name__} packed")


def _swap_modules(model: nn.Module, replaced: dict[int, nn.Module]) -> None:
    for parent in model.modules():
        for child_name, child in list(parent.named_children()):
            if id(child) in replaced:
                setattr(parent, child_name, replaced[id(child)])


def _is_quantized_key(model: nn.Module, key: str) -> bool:
    owner, _, _ = key.rpartition(".")
    return isinstance(dict(model.named_modules(remove_duplicate=False)).get(owner), PackedWeight)
