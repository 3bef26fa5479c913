"""llama.cpp's block types as data: sizes, code ranges, how the scales are stored. Torch-free.

Every type quantizes a row (a weight's input dimension) in blocks of `block` elements, stored in
`block_bytes` bytes each; a row whose length is not a multiple of `block` cannot take the type
(llama.cpp refuses it). Inside a block, `sub` consecutive elements share one effective scale
(and, for types with mins, one offset):

- one level (`Q4_0`, `Q5_0`, `Q8_0`, `Q4_1`, `Q5_1`, `IQ4_NL`, `MXFP4`): the block's fp16 scale
  `d` (an E8M0 power of two for MXFP4), and for `_1` types an fp16 minimum `m`: `w = d q + m`;
- two levels, the K-quants (`Q2_K`..`Q6_K`, `IQ4_XS`): 256-element super-blocks with an fp16
  `d` (and `dmin`) and small integer sub-block scales `sc` (and mins `mn`): `w = d sc q - dmin mn`.

Codes `q` are integers in `[qmin, qmax]` (signed for types without a minimum), or, for codebook
types (`IQ4_NL`, `IQ4_XS`, `MXFP4`), indices into `levels`, a sorted table of values.

`Q2_0` (2-bit codes -1..2 in blocks of 64, 2.25 bits per weight) is the one low-bit type that
fits rows of 576, 640 or 896 elements; llama.cpp's sources have it, the `gguf` package on PyPI
(0.19) does not, and a GGUF file is only written with types the installed `gguf` names
(`GgmlType.available`).

Example:
    >>> t = GGML_TYPES["q4_k"]
    >>> t.block, t.block_bytes, t.bits_per_weight
    (256, 144, 4.5)
    >>> t.fits(576), GGML_TYPES["q4_0"].fits(576)
    (False, True)
    >>> tensor_bytes(576, 1536, t)
    497664
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["GGML_TYPES", "GgmlType", "available_types", "fitting_types", "ggml_type", "tensor_bytes"]

Scales = Literal["d", "d_min", "e8m0", "k_min", "k_sym"]

# IQ4_NL and IQ4_XS codebook (llama.cpp's kvalues_iq4nl), sorted.
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# MXFP4's E2M1 values, doubled (llama.cpp's kvalues_mxfp4), sorted without the repeated zero.
MXFP4_LEVELS = (-12, -8, -6, -4, -3, -2, -1, 0, 1, 2, 3, 4, 6, 8, 12)


@dataclass(frozen=True)
class GgmlType:
    """One llama.cpp block type.

    Attributes:
        name: lowercase name (`q4_k`), the `Choice` label.
        gguf: the name in `gguf.GGMLQuantizationType` (`Q4_K`).
        block: elements per stored block (a row's length must be a multiple).
        block_bytes: bytes per block.
        sub: elements sharing one effective scale.
        bits: bits per code (4 for the 16-value codebooks).
        scales: how the scales are stored: `d` (fp16 per block, signed codes), `d_min` (fp16
            scale and minimum), `e8m0` (a power of two), `k_min` (fp16 `d`, `dmin` and unsigned
            `sc_bits`-bit sub-block scales and mins), `k_sym` (fp16 `d` and signed sub-block scales).
        qmin, qmax: code range (codebook types: 0 and the last index).
        levels: the codebook, or () for integer codes.
        sc_bits: bits of a sub-block scale (and min) for two-level types.
    """

    name: str
    gguf: str
    block: int
    block_bytes: int
    sub: int
    bits: int
    scales: Scales
    qmin: int
    qmax: int
    levels: tuple[int, ...] = ()
    sc_bits: int = 0

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block

    @property
    def sc_range(self) -> tuple[int, int]:
        """Range of a sub-block scale code (two-level types)."""
        if self.scales == "k_min":
            return 0, (1 << self.sc_bits) - 1
        return -(1 << (self.sc_bits - 1)), (1 << (self.sc_bits - 1)) - 1

    def fits(self, cols: int) -> bool:
        """Whether a row of `cols` elements can be stored in this type."""
        return cols > 0 and cols % self.block == 0

    @property
    def available(self) -> bool:
        """Whether the installed `gguf` package knows the type (so a GGUF file can hold it)."""
        try:
            from gguf import GGMLQuantizationType
        except ImportError:
            return False
        return self.gguf in GGMLQuantizationType.__members__


def _types() -> dict[str, GgmlType]:
    k = 256
    table = [
        GgmlType("q8_0", "Q8_0", 32, 34, 32, 8, "d", -128, 127),
        GgmlType("q6_k", "Q6_K", k, 210, 16, 6, "k_sym", -32, 31, sc_bits=8),
        GgmlType("q5_k", "Q5_K", k, 176, 32, 5, "k_min", 0, 31, sc_bits=6),
        GgmlType("q5_1", "Q5_1", 32, 24, 32, 5, "d_min", 0, 31),
        GgmlType("q5_0", "Q5_0", 32, 22, 32, 5, "d", -16, 15),
        GgmlType("q4_k", "Q4_K", k, 144, 32, 4, "k_min", 0, 15, sc_bits=6),
        GgmlType("q4_1", "Q4_1", 32, 20, 32, 4, "d_min", 0, 15),
        GgmlType("q4_0", "Q4_0", 32, 18, 32, 4, "d", -8, 7),
        GgmlType("iq4_nl", "IQ4_NL", 32, 18, 32, 4, "d", 0, 15, IQ4_LEVELS),
        GgmlType("iq4_xs", "IQ4_XS", k, 136, 32, 4, "k_sym", 0, 15, IQ4_LEVELS, sc_bits=6),
        GgmlType("mxfp4", "MXFP4", 32, 17, 32, 4, "e8m0", 0, len(MXFP4_LEVELS) - 1, MXFP4_LEVELS),
        GgmlType("q3_k", "Q3_K", k, 110, 16, 3, "k_sym", -4, 3, sc_bits=6),
        GgmlType("q2_k", "Q2_K", k, 84, 16, 2, "k_min", 0, 3, sc_bits=4),
        GgmlType("q2_0", "Q2_0", 64, 18, 64, 2, "d", -1, 2),
    ]
    return {t.name: t for t in table}


GGML_TYPES: dict[str, GgmlType] = _types()


def ggml_type(name: str) -> GgmlType:
    """The type of a name (any case), or `ValueError` listing the known ones."""
    try:
        return GGML_TYPES[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown GGUF type {name!r}; known: {', '.join(GGML_TYPES)}") from None


def available_types() -> list[GgmlType]:
    """The types the installed `gguf` package knows, widest first."""
    return [t for t in GGML_TYPES.values() if t.available]


def fitting_types(cols: int) -> list[GgmlType]:
    """The types a row of `cols` elements can take, widest first."""
    return [t for t in GGML_TYPES.values() if t.fits(cols)]


def tensor_bytes(rows: int, cols: int, t: GgmlType) -> int:
    """Bytes of a `[rows, cols]` tensor stored as `t` (every row a whole number of blocks)."""
    if not t.fits(cols):
        raise ValueError(f"a row of {cols} elements cannot be stored as {t.gguf} (blocks of {t.block})")
    return rows * (cols // t.block) * t.block_bytes
