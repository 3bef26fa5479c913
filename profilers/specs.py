"""Types the profilers produce: a quantization `Choice`, a `LayerSpec`, and the `ProfileTable` file.

Everything here is a pydantic model because it crosses a boundary: the profile is written to
disk once and re-solved for any budget later, possibly on another machine.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .files import atomic_write_text, load_json_model

__all__ = [
    "PROFILE_FORMAT",
    "PROFILE_VERSION",
    "Choice",
    "ChoiceProfile",
    "LayerKind",
    "LayerProfile",
    "LayerSpec",
    "ProfileError",
    "ProfileTable",
]

PROFILE_FORMAT = "allocator.profile"
PROFILE_VERSION = 1

QUANT_BITS = (2, 3, 4, 5, 6, 7, 8)
FP_BITS = 16

LayerKind = Literal["linear", "conv2d", "embedding"]

_LABEL_RE = re.compile(r"^int(?P<bits>\d+)(?P<sym>s?)(?:x(?P<terms>\d+))?-(?P<group>g\d+|ch)$")


class ProfileError(ValueError):
    """A profile cannot be built or read; the message names the problem and the fix."""


class Choice(BaseModel):
    """How one weight tensor is stored: `terms` low-bit tensors of `bits` each, per group.

    The weight is viewed as a matrix `[rows, cols]` (rows are output channels, or embedding
    rows); groups run along `cols`. Term `t` quantizes the residual the terms before it left.
    `bits == 16` means the tensor stays in floating point (stored as fp16).

    Examples:
        >>> Choice(bits=4, group_size=64).label
        'int4-g64'
        >>> Choice.parse("int2x2-ch")
        Choice(bits=2, terms=2, group_size=None, symmetric=False)
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bits: int = Field(description="bits per code of every term; 16 = unquantized fp16")
    terms: int = Field(default=1, ge=1, le=4, description="number of residual terms")
    group_size: int | None = Field(
        default=None, description="weights sharing one scale along a row; None = one group per row"
    )
    symmetric: bool = Field(default=False, description="signed codes, scale only (no zero point)")

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
    def _fp_is_plain(self) -> Choice:
        if self.bits == FP_BITS and (self.terms != 1 or self.group_size is not None or self.symmetric):
            raise ValueError("the fp16 choice takes no terms, group size or symmetry")
        return self

    @classmethod
    def fp16(cls) -> Choice:
        return cls(bits=FP_BITS)

    @property
    def quantized(self) -> bool:
        return self.bits != FP_BITS

    @property
    def label(self) -> str:
        """Short stable name, e.g. `int4-g64`, `int2x2-g128`, `int8s-ch`, `fp16`."""
        if not self.quantized:
            return "fp16"
        terms = f"x{self.terms}" if self.terms > 1 else ""
        group = f"g{self.group_size}" if self.group_size is not None else "ch"
        return f"int{self.bits}{'s' if self.symmetric else ''}{terms}-{group}"

    @classmethod
    def parse(cls, label: str) -> Choice:
        """Inverse of `label`. Raises `ValueError` naming the accepted forms."""
        text = label.strip().lower()
        if text in ("fp16", "16", "none"):
            return cls.fp16()
        m = _LABEL_RE.match(text)
        if not m:
            raise ValueError(f"cannot read choice {label!r}: write it like int4-g64, int2x2-g128, int8s-ch or fp16")
        group = m["group"]
        return cls(
            bits=int(m["bits"]),
            terms=int(m["terms"] or 1),
            group_size=None if group == "ch" else int(group[1:]),
            symmetric=bool(m["sym"]),
        )

    def __str__(self) -> str:
        return self.label


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
    """Cost and estimated sensitivity of one choice for one layer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    choice: Choice
    bytes: int = Field(ge=0, description="packed codes + scales/zero points, bytes")
    bops: int = Field(ge=0, description="bit operations per sample (MACs x weight bits x act bits x terms)")
    loss: float = Field(ge=0, description="estimated loss increase when only this layer takes this choice")
    loss_stderr: float = Field(default=0.0, ge=0, description="standard error of `loss` (Monte Carlo)")


class LayerProfile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    spec: LayerSpec
    options: tuple[ChoiceProfile, ...]

    @model_validator(mode="after")
    def _distinct_choices(self) -> LayerProfile:
        labels = [o.choice.label for o in self.options]
        if len(set(labels)) != len(labels):
            raise ValueError(f"layer {self.spec.name!r} lists a choice twice")
        if not labels:
            raise ValueError(f"layer {self.spec.name!r} has no options")
        return self

    def option(self, choice: Choice) -> ChoiceProfile:
        for o in self.options:
            if o.choice == choice:
                return o
        raise KeyError(f"layer {self.spec.name!r} was not profiled with {choice.label}")


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
        layers: one entry per quantizable weight, in forward order.
    """

    model_config = ConfigDict(extra="forbid")

    format: Literal["allocator.profile"] = PROFILE_FORMAT
    version: Literal[1] = PROFILE_VERSION
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
    layers: tuple[LayerProfile, ...]

    @model_validator(mode="after")
    def _consistent(self) -> ProfileTable:
        names = [layer.spec.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ValueError("a layer name appears twice")
        if not names:
            raise ValueError("the profile lists no layers")
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
