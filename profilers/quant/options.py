"""The options of a layer: the choice grid and its defaults, fractional options, and how the
options map onto an error stack. Torch-free (the CLI prints these defaults without torch).

Whole-term options (`int4-g64`, `int2x2-ch`, fp16) are rows of an *error stack*
`ΔW = Q(W) - W` (`rounding.error_stack`). A fractional option (`int3+1/4-g64`) is a base row of
the stack with its next-term row swapped in for the `k` rows that gain most; every estimator
scores it from the pair `(base, next)` and a row order, so fractions cost one pair, not one
stack row each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..types import MAX_TERMS, Choice
from .ggml.types import GGML_TYPES, available_types

__all__ = [
    "DEFAULT_BITS",
    "DEFAULT_FRACTIONS",
    "DEFAULT_GROUP_SIZES",
    "DEFAULT_KINDS",
    "DEFAULT_METHOD",
    "DEFAULT_ROTATION",
    "DEFAULT_TERMS",
    "FORMATS",
    "KINDS",
    "LLM_METHOD",
    "METHODS",
    "ROTATIONS",
    "SLOW_GGML_TYPES",
    "FractionPair",
    "OptionLayout",
    "choice_grid",
    "expand_choices",
    "ggml_grid",
    "layout_options",
    "needs_hessian",
    "offered",
    "with_rotation",
]

DEFAULT_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
DEFAULT_TERMS: tuple[int, ...] = (1, 2)
DEFAULT_GROUP_SIZES: tuple[int | None, ...] = (64, 128, None)
DEFAULT_KINDS: tuple[str, ...] = ("residual",)
DEFAULT_FRACTIONS = 8
KINDS: tuple[str, ...] = ("residual", "tied", "joint")
# The rounding under every term (`profilers.quant.rounding`): round to nearest; GPTQ in natural
# column order; GPTQ in activation order with static groups (`desc_act`). On SmolLM2-135M at
# int3-g64, perplexity 100.5 (gptq) against 60.0 (gptq-act); on all-MiniLM-L6-v2 at 12 MB,
# plan cosine 0.9929 (gptq) against 0.9923 (gptq-act).
METHODS: tuple[str, ...] = ("rtn", "gptq", "gptq-act")
DEFAULT_METHOD = "gptq"  # what `allocator.profile` and the CLI round with unless told otherwise
LLM_METHOD = "gptq-act"  # what the CLI rounds causal LMs with unless told otherwise
# Which choices rotate their input space first (`profilers.quant.rotation`): none; every
# quantized choice (`hadamard`); or each choice both ways, the solver picking per layer (`both`).
ROTATIONS: tuple[str, ...] = ("none", "hadamard", "both")
# What the CLI offers unless told otherwise (`choice_grid` and the Python API: none). Measured:
# SmolLM2-135M uniform int3-g64 perplexity 60.0 -> 36.9; all-MiniLM-L6-v2 12 MB plan cosine
# 0.9928 -> 0.9947 (`both` gives the same there, and on SmolLM2 doubles the profile's time).
DEFAULT_ROTATION = "hadamard"
MAX_BITS_PER_WEIGHT = 8  # multi-term settings above 8 bits per weight are never worth their bytes
# The storage formats a profile's choices come from: allocator's own packed file (`native`: the
# `int…` grid of bits, terms and groups) or llama.cpp's block types (`gguf`: `Choice.ggml`).
FORMATS: tuple[str, ...] = ("native", "gguf")
# Block types a GGUF plan leaves out unless asked for (`--types all`): llama.cpp has no repacked
# CPU kernels for them. Measured on this 2-core x86 CPU (llama-bench, 2 threads, SmolLM2-135M, every
# tensor one type): prompt processing 237-279 tokens/s for Q4_1 and 190-210 for Q5_1, against
# 496-544 for Q4_0 and 552-607 for IQ4_NL; allocator's plan at the file size of llama.cpp's Q4_K_S
# mix took Q4_1 for 97% of its weights and processed prompts 27% slower than that mix.
SLOW_GGML_TYPES: tuple[str, ...] = ("q4_1", "q5_1")


def ggml_grid(types: Sequence[str] | None = None) -> list[Choice]:
    """fp16 and llama.cpp block types as choices: the ones named (`["all"]`: every type the
    installed `gguf` package can write, `GgmlType.available`), or by default those but the slow
    ones (`SLOW_GGML_TYPES`), widest first.

    Example:
        >>> [c.label for c in ggml_grid(["q4_0", "q4_k"])]
        ['fp16', 'q4_0', 'q4_k']
    """
    if types is None or list(types) == ["all"]:
        slow = () if types else SLOW_GGML_TYPES
        names = [t.name for t in available_types() if t.name not in slow]
    else:
        names = [t.strip().lower() for t in types]
    return [Choice.fp16(), *dict.fromkeys(Choice(ggml=n) for n in names)]


def offered(choice: Choice, cols: int) -> bool:
    """Whether a weight whose rows hold `cols` elements can take `choice`: a llama.cpp block
    type needs whole blocks per row; every other choice fits any row."""
    return choice.ggml is None or GGML_TYPES[choice.ggml].fits(cols)


def needs_hessian(method: str) -> bool:
    """Whether a rounding method needs each layer's input second moment `H` (the GPTQ ones)."""
    return method in ("gptq", "gptq-act")


def with_rotation(choices: Sequence[Choice], rotation: str) -> list[Choice]:
    """`choices` with every quantized one offered as `rotation` says (a `ROTATIONS` name):
    unrotated, rotated, or both ways; fp16 stays as it is.

    Example:
        >>> [c.label for c in with_rotation([Choice.fp16(), Choice(bits=3, group_size=64)], "both")]
        ['fp16', 'int3-g64', 'int3-g64-had']
    """
    if rotation not in ROTATIONS:
        raise ValueError(f"unknown rotation {rotation!r}; choose one of {', '.join(ROTATIONS)}")
    flags = {"none": (False,), "hadamard": (True,), "both": (False, True)}[rotation]
    # llama.cpp applies no rotation at run time: its block types stay as they are.
    out = [c.model_copy(update={"rotated": r}) if c.quantized and c.ggml is None else c
           for c in choices for r in flags]  # fmt: skip
    return list(dict.fromkeys(out))


def choice_grid(
    bits: Sequence[int] = DEFAULT_BITS,
    terms: Sequence[int] = DEFAULT_TERMS,
    group_sizes: Sequence[int | None] = DEFAULT_GROUP_SIZES,
    *,
    kinds: Sequence[str] = DEFAULT_KINDS,
    max_bits: int = MAX_BITS_PER_WEIGHT,
    symmetric: bool = False,
    rotation: str = "none",
) -> list[Choice]:
    """All (bits, terms, group) combinations with `bits x terms <= max_bits` (single terms are
    always kept), multi-term ones in every requested `kind` that applies (`tied` needs an
    asymmetric grid of at most 16 bits), each quantized one offered as `rotation` says
    (`with_rotation`), plus fp16 (leave the layer unquantized).

    Example:
        >>> [c.label for c in choice_grid((2, 4), (1, 2), (64,))]
        ['fp16', 'int2-g64', 'int2x2-g64', 'int4-g64', 'int4x2-g64']
        >>> [c.label for c in choice_grid((4,), (2,), (64,), kinds=("residual", "tied"))]
        ['fp16', 'int4x2-g64', 'int4x2t-g64']
        >>> [c.label for c in choice_grid((3,), (1,), (64,), rotation="hadamard")]
        ['fp16', 'int3-g64-had']
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown term kind {unknown[0]!r}; choose from {', '.join(KINDS)}")
    out = [Choice.fp16()]
    for g in group_sizes:
        for b in bits:
            for t in terms:
                if t == 1:
                    out.append(Choice(bits=b, group_size=g, symmetric=symmetric))
                    continue
                if b * t > max_bits:
                    continue
                for kind in kinds:
                    if kind == "tied" and (symmetric or b * t > 16):
                        continue
                    out.append(Choice(bits=b, terms=t, group_size=g, symmetric=symmetric, kind=kind))
    return with_rotation(list(dict.fromkeys(out)), rotation)


def expand_choices(
    choices: Sequence[Choice], fractions: int = 0, *, max_bits: int = 8, max_terms: int = 2
) -> list[Choice]:
    """`choices` plus, when `fractions > 1`, the variants of each quantized whole-term choice
    `(b, T, g)` in which `k/fractions` of the rows carry term `T + 1`, for `k = 1..fractions-1`.

    Only bases whose next term stays within `max_bits` bits per weight (`b x (T+1)`) and
    `max_terms` terms get fractions (by default `1 + k/fractions` terms): beyond that a wider
    single term is cheaper.

    Example:
        >>> [c.label for c in expand_choices([Choice(bits=4, group_size=64)], 4)]
        ['int4-g64', 'int4+1/4-g64', 'int4+1/2-g64', 'int4+3/4-g64']
    """
    out = list(dict.fromkeys(choices))
    if fractions > 1:
        for c in list(out):
            if (
                not c.quantized
                or c.ggml is not None  # a block type has one term
                or c.extra
                or c.kind != "residual"  # only residual terms keep their first terms when one is added
                or c.terms + 1 > min(max_terms, MAX_TERMS)
                or c.bits * (c.terms + 1) > max_bits
            ):
                continue
            for k in range(1, fractions):
                out.append(Choice.model_validate({**c.model_dump(), "extra": k, "extra_of": fractions}))
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class FractionPair:
    """A base stack row and its next-term stack row: the two reconstructions a fractional
    option mixes, row by row."""

    base: int
    next: int


@dataclass(frozen=True)
class OptionLayout:
    """How a layer's options map onto its error stack.

    Attributes:
        options: the layer's options, in the order of its estimates.
        stack: whole-term choices, one per stack row (options' bases and next terms).
        whole: per option, its stack row, or -1 for a fractional option.
        pair: per option, its index in `pairs`, or -1 for a whole option.
        rows: per option, rows carrying the extra term (0 for whole options).
        pairs: distinct (base, next) pairs used by fractional options.
        n_paired: the first `n_paired` stack rows are the ones pairs use.
    """

    options: list[Choice]
    stack: list[Choice]
    whole: list[int]
    pair: list[int]
    rows: list[int]
    pairs: list[FractionPair]
    n_paired: int = 0

    def pair_label(self, p: int) -> str:
        return self.stack[self.pairs[p].base].label


def layout_options(options: Sequence[Choice], n_rows: int) -> OptionLayout:
    """Lay out `options` of a weight with `n_rows` rows onto a stack of whole-term errors.

    Stack rows that fractional options mix come first (`stack[:OptionLayout.n_paired]`), so
    per-row work can run on a contiguous slice of the stack.
    """
    wanted: list[Choice] = []
    for c in options:
        wanted += [c.base, c.next_term] if c.extra else [c]
    paired = list(dict.fromkeys(x for c in options if c.extra for x in (c.base, c.next_term)))
    stack = paired + [c for c in dict.fromkeys(wanted) if c not in paired]
    index = {c: k for k, c in enumerate(stack)}

    whole, pair, rows, pairs = [], [], [], []
    pair_index: dict[tuple[int, int], int] = {}
    for c in options:
        if not c.extra:
            whole.append(index[c])
            pair.append(-1)
            rows.append(0)
            continue
        key = (index[c.base], index[c.next_term])
        if key not in pair_index:
            pair_index[key] = len(pairs)
            pairs.append(FractionPair(*key))
        whole.append(-1)
        pair.append(pair_index[key])
        rows.append(c.extra_rows(n_rows))
    return OptionLayout(options=list(options), stack=stack, whole=whole, pair=pair, rows=rows, pairs=pairs,
                        n_paired=len(paired))  # fmt: skip
