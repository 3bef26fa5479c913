"""The part of a plan other runtimes can express: GPTQModel's `dynamic` dict, llama.cpp's
`--tensor-type` lines. Each conversion returns notes saying what it had to drop or round.

What survives:
- single-term choices: bits (and, for GPTQModel, the group size);
- tied terms: exactly, as the single-term grid they form (`int4x2t` is an 8-bit grid), when
  that fits the format's widths;
- fp16 layers: left unquantized.

What does not: residual and joint terms (no format sums low-bit tensors; exported as one term
of the same total bits, capped at 8, which is not the same quantizer), fractional extra terms
(the base choice is exported), and per-layer group sizes in llama.cpp (its block types fix them).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from profilers.types import Choice

from ..planning.plan import Plan

__all__ = ["gptqmodel_dynamic", "llama_cpp_tensor_types"]

# ggml types by weight bits (K-quants, 256-element super-blocks; 8 bits: q8_0).
_GGML = {2: "q2_K", 3: "q3_K", 4: "q4_K", 5: "q5_K", 6: "q6_K", 7: "q8_0", 8: "q8_0"}


def _single_term(choice: Choice, notes: list[str], name: str) -> tuple[int, int | None]:
    """(bits, group) of the one-term quantizer closest to `choice`, with a note where it differs."""
    bits, group = choice.bits, choice.group_size
    if choice.rotated:
        notes.append(f"{name}: Hadamard rotation dropped (the target format has none; rounding differs)")
    if choice.extra:
        notes.append(
            f"{name}: extra term on {choice.extra}/{choice.extra_of} of the rows dropped ({choice.base.label})"
        )
    if choice.terms > 1:
        total = choice.bits * choice.terms
        if choice.kind == "tied" and total <= 8:
            bits = total  # tied terms are exactly this grid
        else:
            bits = min(8, total)
            notes.append(f"{name}: {choice.terms} {choice.kind} terms exported as one {bits}-bit term (not equivalent)")
    return bits, group


def gptqmodel_dynamic(plan: Plan) -> tuple[dict[str, Any], list[str]]:
    """A GPTQModel `QuantizeConfig`: default bits/group_size and a `dynamic` dict of per-module
    overrides (`+:^name$` → {bits, group_size}) and skips (`-:^name$` for fp16 layers).

    Embeddings are not quantized by GPTQModel; they are left out with a note.
    """
    notes: list[str] = []
    settings: dict[str, tuple[int, int | None] | None] = {}
    for name, lp in plan.layers.items():
        if lp.choice.quantized and len(lp.shape) == 2 and "embed" in name.lower():
            notes.append(f"{name}: embedding tables are not quantized by GPTQModel (kept {lp.choice.label} out)")
            continue
        settings[name] = None if not lp.choice.quantized else _single_term(lp.choice, notes, name)
    common = Counter(s for s in settings.values() if s is not None).most_common(1)
    default = common[0][0] if common else (4, 128)
    dynamic: dict[str, dict[str, int]] = {}
    for name, s in settings.items():
        pattern = "^" + re.escape(name) + "$"
        if s is None:
            dynamic["-:" + pattern] = {}
        elif s != default:
            dynamic["+:" + pattern] = {"bits": s[0], "group_size": -1 if s[1] is None else s[1]}
    config = {
        "bits": default[0],
        "group_size": -1 if default[1] is None else default[1],
        "sym": all(lp.choice.symmetric for lp in plan.layers.values() if lp.choice.quantized),
        "dynamic": dynamic,
    }
    if plan.method == "gptq":
        notes.append("the plan was scored for GPTQ rounding, which GPTQModel also applies")
    elif plan.method == "gptq-act":
        config["desc_act"] = True
        notes.append("the plan was scored for GPTQ in activation order (desc_act), which GPTQModel also applies")
    return config, notes


def llama_cpp_tensor_types(plan: Plan) -> tuple[list[str], list[str]]:
    """`--tensor-type` arguments for llama-quantize, one per planned tensor (by its Hugging Face
    name: llama.cpp's converter renames tensors, so map them to GGUF names where they differ)."""
    notes: list[str] = []
    lines = []
    groups_dropped = False
    for name, lp in plan.layers.items():
        if not lp.choice.quantized:
            lines.append(f"--tensor-type {name}.weight=f16")
            continue
        bits, group = _single_term(lp.choice, notes, name)
        groups_dropped |= group is not None
        lines.append(f"--tensor-type {name}.weight={_GGML[bits]}")
    if groups_dropped:
        notes.append("per-layer group sizes dropped: llama.cpp's K-quant blocks fix them (256-weight super-blocks)")
    notes.append("tensor names are the Hugging Face ones; rename to GGUF names (e.g. blk.N.attn_q) where they differ")
    return lines, notes
