"""Checks that a plan or a profile fits the model it is used with (same layer names and weight
shapes), and that the layers a plan quantizes can be quantized (a weight, finite, rows for a
fractional choice's extra term); each refusal is one line."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from profilers.layers import resolve_modules
from profilers.resident import held
from profilers.types import Choice, ProfileError, ProfileTable

from ..errors import PlanError
from ..planning.plan import Plan

__all__ = ["check_plan_fits_model", "check_profile_fits_model", "checked_layers"]


def check_plan_fits_model(model: nn.Module, plan: Plan) -> dict[str, nn.Module]:
    """The plan's layers in `model`, checked to exist with the shapes the plan was made for.

    Raises:
        PlanError: a layer the model lacks, or a weight of another shape.
    """
    shapes = {name: tuple(lp.shape) for name, lp in plan.layers.items()}
    return _check_layers(model, shapes, "the plan", "use the plan made for this model", PlanError)


def check_profile_fits_model(model: nn.Module, table: ProfileTable) -> None:
    """Refuse a profile whose layers (names and weight shapes) are not the model's.

    Raises:
        ProfileError: a layer the model lacks, or a weight of another shape.
    """
    shapes = {n: tuple(layer.spec.shape) for layer in table.layers for n in layer.spec.modules}
    _check_layers(model, shapes, "the profile", "profile this model (allocator profile)", ProfileError)


def _check_layers(
    model: nn.Module, shapes: dict[str, tuple[int, ...]], what: str, fix: str, error: type[Exception]
) -> dict[str, nn.Module]:
    try:
        modules = resolve_modules(model, shapes)
    except ProfileError as e:
        raise error(f"{e}; {fix}") from None
    for name, shape in shapes.items():
        weight = getattr(modules[name], "weight", None)
        if weight is None or tuple(weight.shape) != shape:
            got = None if weight is None else tuple(weight.shape)
            raise error(f"layer {name!r} has weight shape {got} but {what} was made for {shape}; {fix}")
    return modules


def checked_layers(
    model: nn.Module, choices: dict[str, Choice], extra_rows: dict[str, np.ndarray] | None
) -> tuple[dict[str, nn.Module], dict[str, nn.Parameter]]:
    """The named layers and their weights, refused in one line when a name is unknown, a weight
    is missing or not finite, or a fractional choice comes without its rows."""
    try:
        modules = resolve_modules(model, choices)
    except ProfileError as e:
        raise PlanError(str(e)) from None
    weights: dict[str, nn.Parameter] = {}
    for name, module in modules.items():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise PlanError(f"layer {name!r} has no weight to quantize")
        with held(module):
            finite = bool(torch.isfinite(weight.detach()).all())
        if not finite:
            raise PlanError(f"layer {name!r} has NaN or infinite weights; repair or reload the model first")
        weights[name] = weight
        if choices[name].extra and (extra_rows is None or name not in extra_rows):
            raise PlanError(f"layer {name!r} takes {choices[name].label} but no rows were given for its extra term")
    return modules, weights
