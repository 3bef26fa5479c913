"""Per-layer constraints on a plan: which of the profiled choices each layer may take."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import numpy as np

from profilers.types import Choice, ProfileTable

from ..errors import AllocatorError
from .plan import Constraints

__all__ = ["allowed_options"]


def allowed_options(profile: ProfileTable, choices: Sequence[Choice], constraints: Constraints) -> list[np.ndarray]:
    """Per layer, which of `choices` the constraints allow (never one the layer was not profiled
    with: a llama.cpp block type its rows cannot take).

    Raises:
        AllocatorError: a pattern that matches no layer, a pinned choice that was not profiled
            (for a layer: naming its row length and the choices it has), or a layer left with
            no option.
    """
    names = [layer.spec.name for layer in profile.layers]
    labels = [c.label for c in choices]
    masks = [np.array([c in layer.by_choice for c in choices]) for layer in profile.layers]

    def matching(pattern: str, what: str) -> list[int]:
        hits = [i for i, n in enumerate(names) if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            hint = "; layers kept at profile time are already left out" if what == "--keep" else ""
            raise AllocatorError(
                f"{what} pattern {pattern!r} matches no profiled layer (names look like {names[0]!r}){hint}"
            )
        return hits

    if constraints.device_bits is not None:
        ok = np.array([c.quantized and c.bits <= constraints.device_bits for c in choices])
        if not ok.any():
            raise AllocatorError(
                f"no profiled choice has at most {constraints.device_bits} bits per term; "
                f"profile with --device-bits {constraints.device_bits}"
            )
        masks = [m & ok for m in masks]
    for pattern in constraints.keep:
        if Choice.fp16() not in choices:
            raise AllocatorError("--keep needs the fp16 option in the profile")
        fp = np.array([not c.quantized for c in choices])
        for i in matching(pattern, "--keep"):
            masks[i] = masks[i] & fp
    for pattern, label in constraints.pins:
        wanted = Choice.parse(label)
        pin = np.array([x == wanted.label for x in labels])
        for i in matching(pattern, "--pin"):
            layer = profile.layers[i]
            if wanted in layer.by_choice:
                masks[i] = masks[i] & pin
            elif wanted.ggml is None and not pin.any():
                raise AllocatorError(
                    f"--pin asks for {wanted.label}, which the profile has no numbers for; profile it first"
                )
            else:
                raise AllocatorError(
                    f"--pin {pattern}={wanted.label}: layer {names[i]!r} (rows of {layer.spec.cols} elements) cannot"
                    f" take {wanted.label}; it takes {', '.join(o.choice.label for o in layer.options)}"
                )
    for pattern, label_pattern in constraints.forbid:
        banned = np.array([fnmatch.fnmatchcase(x, label_pattern) for x in labels])
        if not banned.any():
            raise AllocatorError(f"--forbid choice pattern {label_pattern!r} matches no profiled choice")
        for i in matching(pattern, "--forbid"):
            masks[i] = masks[i] & ~banned
    for i, m in enumerate(masks):
        if not m.any():
            raise AllocatorError(f"layer {names[i]!r} has no option left after --pin/--forbid/--keep/--device-bits")
    return masks
