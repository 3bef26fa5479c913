"""Find the quantizable weights of a model, and account for everything else it stores.

One entry per weight *tensor*: modules that share a weight (tied embeddings and output
heads, a module called from two places) become one `LayerSpec` with `aliases`, because the
tensor is quantized and stored once.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .quant.cost import FP_BYTES_PER_ELEMENT
from .resident import held, state_with_owners
from .types import LayerKind, LayerSpec, ProfileError

__all__ = [
    "QUANTIZABLE_TYPES",
    "QuantTarget",
    "find_targets",
    "fingerprint_model",
    "fixed_bytes",
    "fp16_bytes",
    "resolve_modules",
]

QUANTIZABLE_TYPES: dict[type[nn.Module], LayerKind] = {
    nn.Linear: "linear",
    nn.Conv2d: "conv2d",
    nn.Embedding: "embedding",
}


@dataclass
class QuantTarget:
    """A quantizable weight, the modules that use it, and its spec."""

    spec: LayerSpec
    weight: nn.Parameter
    modules: list[nn.Module]


def _kind(module: nn.Module) -> LayerKind | None:
    for cls, kind in QUANTIZABLE_TYPES.items():
        if isinstance(module, cls):
            return kind
    return None


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def find_targets(
    model: nn.Module, *, include: Sequence[str] = ("*",), exclude: Sequence[str] = ()
) -> list[QuantTarget]:
    """Quantizable weights of `model` (Linear, Conv2d, Embedding), in registration order.

    Args:
        model: the model.
        include: fnmatch patterns of module names to consider.
        exclude: fnmatch patterns of module names to leave in floating point.

    Raises:
        ProfileError: nothing to quantize, a pattern that matches no layer, or non-finite weights.
    """
    by_weight: dict[int, QuantTarget] = {}
    seen_names: list[str] = []
    for name, module in model.named_modules(remove_duplicate=False):
        kind = _kind(module)
        if kind is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        seen_names.append(name)
        if not _matches(name, include) or _matches(name, exclude):
            continue
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            continue  # circular/reflect padding: left in floating point (see profilers.fisher)
        weight = module.weight
        target = by_weight.get(id(weight))
        if target is not None:
            if module not in target.modules:
                target.modules.append(module)
            if name not in target.spec.modules:
                target.spec = target.spec.model_copy(update={"aliases": (*target.spec.aliases, name)})
            continue
        rows = weight.shape[0]
        by_weight[id(weight)] = QuantTarget(
            spec=LayerSpec(
                name=name,
                kind=kind,
                shape=tuple(weight.shape),
                rows=rows,
                cols=weight.numel() // rows,
            ),
            weight=weight,
            modules=[module],
        )
    for patterns, what in ((include, "--include"), (exclude, "--exclude")):
        for p in patterns:
            if p != "*" and not any(fnmatch.fnmatchcase(n, p) for n in seen_names):
                raise ProfileError(
                    f"{what} pattern {p!r} matches no quantizable layer; layer names look like "
                    f"{', '.join(repr(n) for n in seen_names[:3])}"
                )
    if not by_weight:
        if not seen_names:
            raise ProfileError(
                "the model has nothing to quantize: it contains no nn.Linear, nn.Conv2d or nn.Embedding layer"
            )
        raise ProfileError("every quantizable layer was excluded; loosen --include/--exclude")
    targets = list(by_weight.values())
    for t in targets:
        with held(*t.modules):
            finite = bool(torch.isfinite(t.weight.detach()).all())
        if not finite:
            raise ProfileError(
                f"layer {t.spec.name!r} has NaN or infinite weights; repair or reload the model before quantizing"
            )
    return targets


def resolve_modules(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """Look up modules by qualified name; unknown names raise one error listing them."""
    modules = dict(model.named_modules(remove_duplicate=False))
    missing = [n for n in names if n not in modules]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ProfileError(
            f"the model has no layer named {shown}{more}; the plan or profile was made for another model"
        )
    return {n: modules[n] for n in names}


def _unique_state(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out, seen = [], set()
    for name, t in model.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out.append((name, t))
    return out


def _stored_bytes(t: torch.Tensor) -> int:
    if t.is_floating_point():
        return t.numel() * FP_BYTES_PER_ELEMENT
    return t.numel() * t.element_size()


def fixed_bytes(model: nn.Module, targets: Sequence[QuantTarget]) -> int:
    """Bytes of every stored tensor that is not a quantizable weight (floats kept in fp16)."""
    quantized = {id(t.weight) for t in targets}
    return sum(_stored_bytes(t) for _, t in _unique_state(model) if id(t) not in quantized)


def fp16_bytes(model: nn.Module) -> int:
    """Bytes of the whole model with every floating-point tensor stored in fp16."""
    return sum(_stored_bytes(t) for _, t in _unique_state(model))


def fingerprint_model(model: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and values of the model's state, hex."""
    h = hashlib.sha256()
    for name, t, owner in sorted(state_with_owners(model), key=lambda entry: entry[0]):
        if not isinstance(t, torch.Tensor):
            continue
        with held(owner):  # a block read on use: its values, one block at a time
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
