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
    """Per layer, which of `choices` the constraints allow.

    Raises:
        AllocatorError: a pattern that matches no layer, a pinned choice that was not profiled,
            or a layer left with no option.
    """
    names = [layer.spec.name for layer in profile.layers]
    labels = [c.label for c in choices]
    masks = [np.ones(len(choices), dtype=bool) for _ in names]

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
        wanted = Choice.parse(label).label
        if wanted not in labels:
            raise AllocatorError(f"--pin asks for {wanted}, which the profile has no numbers for; profile it first")
        pin = np.array([x == wanted for x in labels])
        for i in matching(pattern, "--pin"):
            masks[i] = masks[i] & pin
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
