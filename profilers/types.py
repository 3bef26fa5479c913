"""Types the profilers produce: a quantization `Choice`, a `LayerSpec`, and the `ProfileTable` file.

Everything here is a pydantic model because it crosses a boundary: the profile is written to
disk once and re-solved for any budget later, possibly on another machine.
"""

from __future__ import annotations

import base64
import functools
import math
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .files import atomic_write_text, load_json_model
from .quant.ggml.types import GGML_TYPES

__all__ = [
    "MAX_TERMS",
    "MAX_TOTAL",
    "PROFILE_FORMAT",
    "PROFILE_VERSION",
    "Choice",
    "ChoiceProfile",
    "DataSplit",
    "LayerKind",
    "LayerProfile",
    "LayerSpec",
    "ProfileError",
    "ProfileTable",
    "Validation",
    "decode_indices",
    "encode_indices",
]

PROFILE_FORMAT = "allocator.profile"
# 2: choices may be llama.cpp block types (`Choice.ggml`) and layers may differ in options; 1 is read too.
PROFILE_VERSION = 2

QUANT_BITS = (2, 3, 4, 5, 6, 7, 8)
FP_BITS = 16
MAX_TERMS = 4
MAX_TOTAL = 10**18  # largest sum of bytes (or BOPs) a profile may describe: exact in int64 with room to spare

LayerKind = Literal["linear", "conv2d", "embedding"]

_LABEL_RE = re.compile(
    r"^int(?P<bits>\d+)(?P<sym>s?)(?:x(?P<terms>\d+)(?P<kind>[tj]?))?(?:\+(?P<num>\d+)/(?P<den>\d+))?-(?P<group>g\d+|ch)(?P<rot>-had)?$"
)
TermKind = Literal["residual", "tied", "joint"]
_KIND_SUFFIX = {"residual": "", "tied": "t", "joint": "j"}


class ProfileError(ValueError):
    """A profile cannot be built or read; the message names the problem and the fix."""


class Choice(BaseModel):
    """How one weight tensor is stored: `terms` low-bit tensors of `bits` each, per group.

    The weight is viewed as a matrix `[rows, cols]` (rows are output channels, or embedding
    rows); groups run along `cols`. Term `t` quantizes the residual the terms before it left.
    With `extra/extra_of > 0`, that fraction of the rows (the ones whose residual hurts most,
    chosen by the profiler) carries one more term: `terms + extra/extra_of` terms on average,
    so complexity grows continuously instead of in whole terms. `bits == 16` means the tensor
    stays in floating point (stored as fp16).

    How several terms relate (`kind`):

    - `residual` (default): each term quantizes what the ones before left, with its own scale
      and zero point per group;
    - `tied` (`int4x2t-g64`): one scale and zero point per group for all terms, term t's step
      being the first's divided by 2^(bits·(t-1)): the terms are the digits of a finer
      `bits·terms`-bit grid (int8 quality from int4 pieces), and the metadata is stored once;
    - `joint` (`int2x2j-g64`): independent scales refined jointly (alternating least-squares
      updates of every term's scale and re-rounding of its codes).

    With `rotated` (`int3-g64-had`), the terms store `W R` for a fixed randomized Hadamard
    rotation `R` of the input space (`profilers.quant.rotation`), and the weight is `Q(W R) Rᵀ`:
    outliers spread over many columns round far better at 2-4 bits.

    With `ggml` (`q4_k`, `iq4_nl`, ...), the tensor is stored in one of llama.cpp's block types
    (`profilers.quant.ggml.types`), as a GGUF file holds it: one term, `bits` the type's code
    bits, its blocks and scales the type's own.

    Examples:
        >>> Choice(bits=4, group_size=64).label
        'int4-g64'
        >>> Choice.parse("int2x2-ch") == Choice(bits=2, terms=2, group_size=None)
        True
        >>> Choice(bits=3, extra=2, extra_of=8, group_size=64).label  # a quarter of rows: 2 terms
        'int3+1/4-g64'
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bits: int = Field(description="bits per code of every term; 16 = unquantized fp16")
    terms: int = Field(default=1, ge=1, le=MAX_TERMS, description="number of residual terms")
    group_size: int | None = Field(
        default=None, description="weights sharing one scale along a row; None = one group per row"
    )
    symmetric: bool = Field(default=False, description="signed codes, scale only (no zero point)")
    kind: TermKind = Field(default="residual", description="how several terms relate (see above)")
    extra: int = Field(default=0, ge=0, description="numerator of the share of rows with one more term")
    extra_of: int = Field(default=1, ge=1, description="denominator of that share")
    rotated: bool = Field(default=False, description="terms store W R, R a randomized Hadamard rotation")
    ggml: str | None = Field(default=None, description="a llama.cpp block type (q4_k, ...): the GGUF format")

    @model_validator(mode="before")
    @classmethod
    def _reduce_fraction(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("ggml") is not None:
            name = str(data["ggml"]).strip().lower()
            if name not in GGML_TYPES:
                raise ValueError(f"unknown GGUF type {data['ggml']!r}; known: {', '.join(GGML_TYPES)}")
            data = {"bits": GGML_TYPES[name].bits, **data, "ggml": name}
        if isinstance(data, dict) and "extra" in data:
            num, den = int(data.get("extra", 0)), int(data.get("extra_of", 1))
            if num == 0:
                data = {**data, "extra": 0, "extra_of": 1}
            elif den >= 1 and num >= 0:
                g = math.gcd(num, den)
                data = {**data, "extra": num // g, "extra_of": den // g}
        return data

    @field_validator("bits")
    @classmethod
    def _known_bits(cls, bits: int) -> int:
        if bits not in (*QUANT_BITS, FP_BITS):
            raise ValueError(f"bits must be one of {(*QUANT_BITS, FP_BITS)}, got {bits}")
        return bits

    @field_validator("group_size")
    @classmethod
    def _positive_group(cls, group_size: int | None) -> int | None:
        if group_size is not None and group_size < 1:
            raise ValueError(f"group_size must be a positive integer or None (per channel), got {group_size}")
        return group_size

    @model_validator(mode="after")
    def _consistent(self) -> Choice:
        if self.ggml is not None and (
            self.bits != GGML_TYPES[self.ggml].bits or self.terms != 1 or self.group_size is not None
            or self.symmetric or self.kind != "residual" or self.extra or self.rotated
        ):  # fmt: skip
            raise ValueError(f"the GGUF type {self.ggml} fixes its bits and blocks: give it alone (ggml={self.ggml!r})")
        if self.bits == FP_BITS and (
            self.terms != 1 or self.group_size is not None or self.symmetric or self.extra or self.rotated
        ):
            raise ValueError("the fp16 choice takes no terms, group size, symmetry, extra fraction or rotation")
        if self.extra >= self.extra_of:
            raise ValueError(f"the extra share {self.extra}/{self.extra_of} must be below 1; add a whole term instead")
        if self.extra and self.terms + 1 > MAX_TERMS:
            raise ValueError(f"an extra share needs room for term {self.terms + 1}; at most {MAX_TERMS} terms")
        if self.kind != "residual" and self.terms < 2:
            raise ValueError(f"{self.kind} terms need at least 2 terms")
        if self.kind == "tied" and (self.symmetric or self.extra or self.bits * self.terms > 16):
            raise ValueError("tied terms are asymmetric, whole, and at most 16 bits in all")
        return self

    @classmethod
    def fp16(cls) -> Choice:
        return cls(bits=FP_BITS)

    @property
    def quantized(self) -> bool:
        return self.bits != FP_BITS

    @property
    def family(self) -> Literal["native", "ggml"]:
        """The storage format a quantized choice belongs to (`fp16` belongs to both)."""
        return "ggml" if self.ggml is not None else "native"

    @property
    def rho(self) -> float:
        """Share of rows carrying the extra term (0 when none)."""
        return self.extra / self.extra_of

    @property
    def base(self) -> Choice:
        """The same choice without the extra share."""
        return self.model_copy(update={"extra": 0, "extra_of": 1}) if self.extra else self

    @property
    def next_term(self) -> Choice:
        """The base choice with one more whole term (what the extra rows get)."""
        return self.model_copy(update={"terms": self.terms + 1, "extra": 0, "extra_of": 1})

    def extra_rows(self, rows: int) -> int:
        """Number of rows of a `rows`-row weight that carry the extra term (rounded half up)."""
        return (2 * rows * self.extra + self.extra_of) // (2 * self.extra_of)

    @property
    def label(self) -> str:
        """Short stable name, e.g. `int4-g64`, `int2x2-g128`, `int4x2t-g64`, `int3+3/8-g64`, `int3-g64-had`,
        `q4_k`, `fp16`."""
        if not self.quantized:
            return "fp16"
        if self.ggml is not None:
            return self.ggml
        terms = f"x{self.terms}{_KIND_SUFFIX[self.kind]}" if self.terms > 1 else ""
        extra = f"+{self.extra}/{self.extra_of}" if self.extra else ""
        group = f"g{self.group_size}" if self.group_size is not None else "ch"
        rotated = "-had" if self.rotated else ""
        return f"int{self.bits}{'s' if self.symmetric else ''}{terms}{extra}-{group}{rotated}"

    @classmethod
    def parse(cls, label: str) -> Choice:
        """Inverse of `label`. Raises `ValueError` naming the accepted forms."""
        text = label.strip().lower()
        if text in ("fp16", "f16", "16", "none"):
            return cls.fp16()
        if text in GGML_TYPES:
            return cls(ggml=text)
        m = _LABEL_RE.match(text)
        if not m:
            raise ValueError(
                f"cannot read choice {label!r}: write it like int4-g64, int2x2-g128, int4x2t-g64, int3+1/4-ch,"
                " int3-g64-had, a GGUF type (q4_k, iq4_nl, ...) or fp16"
            )
        group = m["group"]
        return cls(
            bits=int(m["bits"]),
            terms=int(m["terms"] or 1),
            group_size=None if group == "ch" else int(group[1:]),
            symmetric=bool(m["sym"]),
            kind={"": "residual", "t": "tied", "j": "joint"}[m["kind"] or ""],
            extra=int(m["num"] or 0),
            extra_of=int(m["den"] or 1),
            rotated=bool(m["rot"]),
        )

    def __str__(self) -> str:
        return self.label


def encode_indices(indices: Sequence[int] | np.ndarray) -> str:
    """Row indices as compact text (little-endian uint32, zlib, base64) for JSON files."""
    arr = np.asarray(indices, dtype="<u4")
    return base64.b64encode(zlib.compress(arr.tobytes(), 1)).decode("ascii")


def decode_indices(text: str, *, limit: int | None = None) -> np.ndarray:
    """Inverse of `encode_indices`; raises `ValueError` on corrupt text or indices >= `limit`."""
    try:
        raw = zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True))
    except (ValueError, zlib.error) as e:
        raise ValueError(f"corrupt index list ({e})") from None
    if len(raw) % 4:
        raise ValueError("corrupt index list (length is not a multiple of 4 bytes)")
    arr = np.frombuffer(raw, dtype="<u4").astype(np.int64)
    if limit is not None and arr.size and int(arr.max()) >= limit:
        raise ValueError(f"index {int(arr.max())} is out of range for {limit} rows")
    return arr


class LayerSpec(BaseModel):
    """One quantizable weight tensor and the modules that use it.

    Attributes:
        name: fully qualified name of the first module that owns the weight.
        kind: module type.
        shape: the weight's shape as stored.
        rows: output channels (or embedding rows) of the matrix view.
        cols: elements per row of the matrix view (`in_features`, `in/groups*kh*kw`, `dim`).
        aliases: other modules that use the very same weight tensor (tied weights).
        macs: multiply-accumulates per sample through this weight, averaged over calibration.
        order: position of the first call in the model's forward pass.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    kind: LayerKind
    shape: tuple[int, ...]
    rows: int = Field(ge=1)
    cols: int = Field(ge=1)
    aliases: tuple[str, ...] = ()
    macs: int = Field(default=0, ge=0)
    order: int = Field(default=0, ge=0)

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def modules(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


class ChoiceProfile(BaseModel):
    """Cost and estimated sensitivity of one choice for one layer (finite numbers only)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    choice: Choice
    bytes: int = Field(ge=0, description="packed codes + scales/zero points, bytes")
    bops: int = Field(ge=0, description="bit operations per sample (MACs x weight bits x act bits x terms)")
    loss: float = Field(ge=0, description="estimated loss increase when only this layer takes this choice")
    loss_stderr: float = Field(default=0.0, ge=0, description="standard error of `loss` (Monte Carlo)")


class LayerProfile(BaseModel):
    """All options of one layer, and for fractional options the order in which rows get the
    extra term (`channel_orders[base label]`, encoded with `encode_indices`; the first
    `choice.extra_rows(rows)` rows of that order carry it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    spec: LayerSpec
    options: tuple[ChoiceProfile, ...]
    channel_orders: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _distinct_choices(self) -> LayerProfile:
        labels = [o.choice.label for o in self.options]
        if len(set(labels)) != len(labels):
            raise ValueError(f"layer {self.spec.name!r} lists a choice twice")
        if not labels:
            raise ValueError(f"layer {self.spec.name!r} has no options")
        for o in self.options:
            if o.choice.extra and o.choice.base.label not in self.channel_orders:
                raise ValueError(f"layer {self.spec.name!r} has {o.choice.label} but no channel order for it")
        return self

    @functools.cached_property
    def by_choice(self) -> dict[Choice, ChoiceProfile]:
        """The options keyed by choice (built once: planning looks up every layer x choice)."""
        return {o.choice: o for o in self.options}

    def option(self, choice: Choice) -> ChoiceProfile:
        try:
            return self.by_choice[choice]
        except KeyError:
            raise KeyError(f"layer {self.spec.name!r} was not profiled with {choice.label}") from None

    def extra_rows(self, choice: Choice) -> np.ndarray:
        """Sorted indices of the rows that carry the extra term under a fractional `choice`."""
        if not choice.extra:
            return np.zeros(0, dtype=np.int64)
        order = decode_indices(self.channel_orders[choice.base.label], limit=self.spec.rows)
        return np.sort(order[: choice.extra_rows(self.spec.rows)])


class DataSplit(BaseModel):
    """Where the calibration data came from and how it was split from the evaluation data, so a
    plan can be evaluated (and GPTQ-rounded) on the same split later."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(description="the --data argument, or the built-in data's name")
    unit: str = Field(description="what one item is: documents, images, samples")
    calibration: int = Field(ge=1, description="items used for calibration")
    evaluation: int = Field(ge=0, description="the other items, held out for evaluation")
    seed: int = Field(description="seed of the random split")
    max_length: int | None = Field(default=None, description="tokens per document (text)")
    batch_size: int = Field(ge=1)
    builtin: bool = Field(default=False, description="the model's own data (no --data given)")
    corpus: str | None = Field(
        default=None,
        description="the built-in text read: news or mix (None: a --data path, or news in files made before the mix)",
    )


class Validation(BaseModel):
    """How well a proxy's estimates agree with measured output divergence."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pairs: int = Field(description="(layer, choice) pairs measured")
    spearman: float = Field(description="rank correlation of estimated vs measured single-layer loss")
    plans: int = Field(description="random whole-model plans measured")
    additivity_pearson: float = Field(description="correlation of summed estimates with measured plan loss")
    additivity_ratio: float = Field(description="median measured / summed-estimate ratio over the plans")
    seconds: float = 0.0
    batches: int = Field(0, description="calibration batches the divergence was measured on (0: not recorded)")

    @property
    def trustworthy(self) -> bool:
        return self.spearman >= 0.8 and self.additivity_pearson >= 0.9


class ProfileTable(BaseModel):
    """Per-layer, per-choice cost and sensitivity; solved for any budget without the model.

    Attributes:
        model_fingerprint: hash of the weights that were profiled (stale-profile detection).
        data_fingerprint: hash of the calibration batches.
        profiler: estimator that produced `loss` (e.g. "fisher").
        loss_units: what one unit of `loss` means.
        act_bits: activation bits assumed by the BOPs cost.
        fixed_bytes: bytes of everything not listed in `layers` (biases, norms; fp16).
        fp16_bytes: bytes of the whole model stored in fp16 (the reference for `25%` budgets).
        kept_fp16: quantizable layers that never ran during calibration; left in fp16 and
            counted in `fixed_bytes`.
        file_overhead: bytes reserved for the header of the packed file (tensor index and
            metadata), an upper bound, so a byte budget holds for the file on disk.
        layers: one entry per quantizable weight, in forward order.
    """

    model_config = ConfigDict(extra="forbid")

    format: Literal["allocator.profile"] = PROFILE_FORMAT
    version: Literal[1, 2] = PROFILE_VERSION
    model_name: str = ""
    model_fingerprint: str
    data_fingerprint: str
    profiler: str
    settings: dict[str, str | int | float | bool | None] = Field(default_factory=dict)
    loss_units: str
    act_bits: int = Field(default=16, ge=1, le=32)
    fixed_bytes: int = Field(ge=0)
    fp16_bytes: int = Field(ge=0)
    kept_fp16: tuple[str, ...] = ()
    file_overhead: int = Field(default=0, ge=0, description="bytes reserved for the packed file's header")
    validation: Validation | None = None
    data: DataSplit | None = Field(default=None, description="the calibration split, when known")
    layers: tuple[LayerProfile, ...]

    @model_validator(mode="after")
    def _consistent(self) -> ProfileTable:
        names = [layer.spec.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ValueError("a layer name appears twice")
        if not names:
            raise ValueError("the profile lists no layers")
        for what in ("bytes", "bops"):  # sums of costs must stay exact in 64-bit integers
            most = sum(max(getattr(o, what) for o in layer.options) for layer in self.layers)
            if most + self.fixed_bytes + self.fp16_bytes > MAX_TOTAL:
                raise ValueError(f"the profile's {what} add up to more than {MAX_TOTAL:.0e}; no model is that large")
        return self

    @property
    def names(self) -> list[str]:
        return [layer.spec.name for layer in self.layers]

    def layer(self, name: str) -> LayerProfile:
        for layer in self.layers:
            if layer.spec.name == name:
                return layer
        raise KeyError(name)

    @property
    def quantizable_params(self) -> int:
        return sum(layer.spec.numel for layer in self.layers)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the profile as JSON, atomically (a crash never leaves a half-written file)."""
        return atomic_write_text(path, self.model_dump_json(indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ProfileTable:
        """Read a profile, refusing anything that is not a complete profile of this version."""
        return load_json_model(cls, path, what="profile", format_name=PROFILE_FORMAT, error=ProfileError)
