"""Uniform settings (one choice for every layer), priced on a profile: what a plan must beat."""

from __future__ import annotations

from collections.abc import Sequence

from profilers.types import Choice, ProfileTable

from .budget import Resource
from .plan import UniformPoint

__all__ = ["all_choices", "common_choices", "uniform_points"]


def all_choices(profile: ProfileTable) -> list[Choice]:
    """Every choice any layer was profiled with, in order of first appearance (a llama.cpp block
    type is absent from the layers whose rows it cannot divide)."""
    return list(dict.fromkeys(o.choice for layer in profile.layers for o in layer.options))


def common_choices(profile: ProfileTable) -> list[Choice]:
    """Choices every layer was profiled with, in the first layer's order."""
    first = [o.choice for o in profile.layers[0].options]
    common = set(first)
    for layer in profile.layers[1:]:
        common &= {o.choice for o in layer.options}
    return [c for c in first if c in common]


def uniform_points(
    profile: ProfileTable, limits: dict[Resource, int], choices: Sequence[Choice] | None = None
) -> list[UniformPoint]:
    """Every quantized whole-term choice applied to all layers, priced by the profile; least
    loss first. (Fractional choices are not uniform settings: their rows differ per layer.)"""
    points = []
    for c in choices if choices is not None else common_choices(profile):
        if not c.quantized or c.extra:
            continue
        opts = [layer.option(c) for layer in profile.layers]
        q_bytes = sum(o.bytes for o in opts)
        bops = sum(o.bops for o in opts)
        fits = q_bytes <= limits.get("bytes", q_bytes) and bops <= limits.get("bops", bops)
        points.append(
            UniformPoint(
                choice=c,
                bytes=q_bytes + profile.fixed_bytes + profile.file_overhead,
                bpw=8 * q_bytes / profile.quantizable_params,
                bops=bops,
                loss=float(sum(o.loss for o in opts)),
                fits=fits,
            )
        )
    points.sort(key=lambda p: (p.loss, p.bytes))
    return points
