"""Other quantizers at the plan's size, so `allocator evaluate` can show what they would give.

A peer quantizes the same layers the plan covers and must fit the same bytes: its size is
counted like the plan's (packed weights plus every scale and zero point, everything else
fp16), and only settings within the plan's bits per weight are offered to it.

- `minmax`: plain round-to-nearest on each group's min/max range (asymmetric, fp16 scale and
  zero point), the baseline every LLM quantizer starts from; built in.
- `hqq`: HQQ's half-quadratic uniform quantization (`hqq` package), one bit width and group
  size for every layer; the fitting settings closest to the plan's size are measured.
- `modelopt`: NVIDIA ModelOpt AutoQuantize (`nvidia-modelopt`), its own per-layer search over
  weight-only INT2/3/4 block-128 and INT8 per-channel formats, with its gradient sensitivity
  on the calibration batches and its effective-bits constraint set so that bits plus scales
  stay within the plan's bits per weight.

Peers are optional (`pip install 'allocator[compare]'`); a missing one is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from profilers.tasks import Task
from profilers.types import Choice

from ..errors import AllocatorError
from ..planning.plan import Plan

__all__ = ["PEERS", "PeerModel", "PeerSkipped", "hqq_settings", "modelopt_model", "peer_variants", "round_layers_"]

PEERS = ("minmax", "hqq", "modelopt")
_PACKAGES = {"hqq": "hqq", "modelopt": "modelopt"}  # peers from other packages (minmax is built in)
_INSTALL = {"hqq": "hqq", "modelopt": "nvidia-modelopt"}


class PeerSkipped(Exception):
    """A peer cannot make a variant for this plan (e.g. no setting of its own reaches the plan's
    size); the message says why, and `compare` lists it with the skipped peers."""


@dataclass
class PeerModel:
    """A model quantized by a peer: its label, size as the plan counts it, and how long it took."""

    label: str
    model: nn.Module
    bytes: int
    bpw: float
    seconds: float
    fits: bool = True


@dataclass(frozen=True)
class PeerVariant:
    """A peer setting to measure; `build` quantizes a copy of the model when called."""

    label: str
    build: Callable[[], PeerModel]


def _layers(model: nn.Module, plan: Plan) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    missing = [n for n in plan.layers if n not in modules]
    if missing:
        raise AllocatorError(f"the model has no layer {missing[0]!r} of the plan; evaluate the model the plan is for")
    return {n: modules[n] for n in plan.layers}


def _limit(plan: Plan) -> int:
    """Bytes a peer may spend on the planned weights: the budget's, else what the plan spends."""
    return max(plan.limits.get("bytes", 0), plan.predicted.quantized_bytes)


def _whole(plan: Plan, size: int) -> int:
    """Whole-model bytes counted as the plan counts them: fp16 rest and file header allowance."""
    return plan.fixed_bytes + plan.predicted.file_overhead + size


def _planned_weights(plan: Plan) -> int:
    return sum(math.prod(lp.shape) for lp in plan.layers.values())


def _rows(weight: torch.Tensor) -> tuple[int, int]:
    return weight.shape[0], weight[0].numel()


def hqq_settings(plan: Plan, model: nn.Module, *, top: int = 2) -> list[tuple[int, int | None, int]]:
    """The `top` largest one-setting peer settings `(bits, group or None for a row, planned
    bytes)` within the plan's byte budget. HQQ and min/max rounding keep an fp16 scale and zero
    point per group."""
    layers = _layers(model, plan)
    limit = _limit(plan)
    out = []
    for bits in (2, 3, 4, 8):
        for group in (32, 64, 128, None):
            total = 0
            for m in layers.values():
                rows, cols = _rows(m.weight)
                if group is not None and cols % group:
                    break
                groups = rows * (cols // group if group else 1)
                total += math.ceil(rows * cols * bits / 8) + 4 * groups
            else:
                if total <= limit:
                    out.append((bits, group, total))
    return sorted(out, key=lambda s: -s[2])[:top]


_NAMES = {"hqq": "HQQ", "minmax": "RTN min/max"}


def _group_label(peer: str, bits: int, group: int | None) -> str:
    """`HQQ int3-g64`, `RTN min/max int4-ch`: the peer and our own label of the same setting."""
    return f"{_NAMES[peer]} {Choice(bits=bits, group_size=group).label}"


def _hqq_rows(flat: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    from hqq.core.quantize import Quantizer

    # Unpacked codes: HQQ's bit packing needs the group count divisible by 8 / bits (LeNet's is not),
    # and the values are the same packed or not.
    w_q, meta = Quantizer.quantize(flat, nbits=bits, group_size=group, optimize=True, axis=1, bitpack=False,
                                   device="cpu", compute_dtype=torch.float32)  # fmt: skip
    return Quantizer.dequantize(w_q, meta)


def _minmax_rows(flat: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    from profilers.quant.quantize import dequantize, quantize_groups

    return dequantize(quantize_groups(flat, bits=bits, group_size=group, symmetric=False, clip=(1.0,)))


def round_layers_(model: nn.Module, names: Sequence[str], peer: str, bits: int, group: int | None) -> nn.Module:
    """Round the named layers of `model` in place with a one-setting peer (`minmax`, `hqq`),
    stored as fp16 as the plan's own variants are; returns `model`."""
    rounding = _hqq_rows if peer == "hqq" else _minmax_rows
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in names:
            w = modules[name].weight
            rows, cols = _rows(w)
            rebuilt = rounding(w.detach().float().reshape(rows, cols), bits, group or cols)
            w.copy_(rebuilt.reshape(w.shape).half().to(w.dtype))
    return model


def _group_model(model: nn.Module, plan: Plan, peer: str, bits: int, group: int | None, size: int) -> PeerModel:
    """A copy of `model` with every planned layer rounded by a one-setting peer."""
    started = time.perf_counter()
    q = round_layers_(copy.deepcopy(model), list(_layers(model, plan)), peer, bits, group)
    bpw = 8 * size / _planned_weights(plan)
    seconds = time.perf_counter() - started
    return PeerModel(_group_label(peer, bits, group), q, _whole(plan, size), bpw, seconds, size <= _limit(plan))


def _modelopt_format(bits: int, block: int | None) -> dict[str, Any]:
    quantizer: dict[str, Any] = {"num_bits": bits, "axis": 0}
    if block:
        quantizer = {"num_bits": bits, "block_sizes": {-1: block, "type": "static"}}
    return {
        "quant_cfg": [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*weight_quantizer", "cfg": quantizer},
        ],
        "algorithm": "max",
    }


def modelopt_model(model: nn.Module, plan: Plan, calib: Sequence[Any], task: Task, *, seed: int = 0) -> PeerModel:
    """ModelOpt AutoQuantize on a copy of `model`, searching weight-only INT2/3/4 (block 128, or
    per row when a row is not a multiple of 128) and INT8 per-row formats for the plan's layers,
    within the plan's bits per weight counting fp16 scales."""
    started = time.perf_counter()
    q = copy.deepcopy(model)
    layers = _layers(q, plan)
    if not all(isinstance(m, nn.Linear) for m in layers.values()):
        raise AllocatorError("the ModelOpt peer is run on Linear layers only")
    block = 128 if all(m.in_features % 128 == 0 for m in layers.values()) else None
    formats = {bits: _modelopt_format(bits, block if bits < 8 else None) for bits in (2, 3, 4, 8)}
    # one fp16 scale per block, or per row (symmetric: no zero point); the worst layer's share is
    # taken off ModelOpt's effective-bits target, which counts the integer bits alone
    overhead = max(16 / (block if block else m.in_features) for m in layers.values())
    others = [n for n, m in q.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n not in layers]
    generator = torch.Generator().manual_seed(seed)

    def loss(out: torch.Tensor, batch: Any) -> torch.Tensor:  # the same pseudo-label loss our Fisher uses
        return (out * task.pseudo_gradient(out.detach(), batch, generator)).sum()

    # ModelOpt warns about untested transformers versions and draws tqdm bars: kept off the console
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as mtq

        target = max(plan.predicted.bpw - overhead, 2.0)
        try:
            q, state = mtq.auto_quantize(
                q,
                constraints={"effective_bits": target},
                quantization_formats=list(formats.values()),
                data_loader=list(calib),
                forward_step=task.forward,
                loss_func=loss,
                disabled_layers=others or None,
                num_calib_steps=len(calib),
                num_score_steps=len(calib),
            )
        except ValueError as e:  # its search space cannot reach the target: a fact about ModelOpt
            if "infeasible" not in str(e):
                raise
            raise PeerSkipped(f"modelopt: {str(e).rstrip('.')} for this model") from None
    recipe = state["best"]["recipe"]
    size = 0
    for name, m in layers.items():
        chosen = recipe.get(f"{name}.quant_recipe")
        bits = _recipe_bits(chosen)
        rows, cols = _rows(m.weight)
        if bits is None:
            size += 2 * rows * cols
        else:
            groups = rows * (cols // block if block and bits < 8 else 1)
            size += math.ceil(rows * cols * bits / 8) + 2 * groups
    bpw = 8 * size / _planned_weights(plan)
    q.eval()
    seconds = time.perf_counter() - started
    return PeerModel("ModelOpt AutoQuantize", q, _whole(plan, size), bpw, seconds, size <= _limit(plan))


def _recipe_bits(recipe: Any) -> int | None:
    """Bits of a ModelOpt recipe, from its compression (a share of 16 bits); None: left in fp16."""
    compression = getattr(recipe, "compression", None)
    if compression is None or compression >= 1.0:
        return None
    return round(16 * compression)


def peer_variants(
    names: Sequence[str], model: nn.Module, plan: Plan, calib: Sequence[Any], task: Task, *, seed: int = 0
) -> tuple[list[PeerVariant], list[str]]:
    """The peer settings to measure, and a line per peer that is skipped and why."""
    variants: list[PeerVariant] = []
    skipped: list[str] = []
    for name in names:
        if name not in PEERS:
            raise AllocatorError(f"unknown peer {name!r}: choose from {', '.join(PEERS)}")
        if name in _PACKAGES and importlib.util.find_spec(_PACKAGES[name]) is None:
            skipped.append(f"{name}: not installed (pip install {_INSTALL[name]}, or 'allocator[compare]')")
            continue
        if name in ("hqq", "minmax"):
            settings = hqq_settings(plan, model)
            if not settings:
                skipped.append(f"{name}: no {_NAMES[name]} setting fits the plan's size")
            for bits, group, size in settings:
                build = lambda p=name, b=bits, g=group, s=size: _group_model(model, plan, p, b, g, s)  # noqa: E731
                variants.append(PeerVariant(_group_label(name, bits, group), build))
        else:
            layers = _layers(model, plan)
            if not all(isinstance(m, nn.Linear) for m in layers.values()):
                skipped.append("modelopt: run here on Linear layers only, and this plan has others")
                continue
            variants.append(
                PeerVariant("ModelOpt AutoQuantize", lambda: modelopt_model(model, plan, calib, task, seed=seed))
            )
    return variants, skipped
