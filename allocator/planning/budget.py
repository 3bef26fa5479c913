"""Budgets as users write them, parsed in one place.

| text        | meaning                                                               |
|-------------|-----------------------------------------------------------------------|
| `12MB`      | whole model at most 12·10^6 bytes (`0.3GB`, `500kB`; decimal units)   |
| `300MiB`    | binary units (2^20)                                                   |
| `3.5bpw`    | average bits per quantizable weight, scales and zero points included  |
| `25%`       | share of the whole model's fp16 size                                  |
| `40GBOPs`   | bit operations per sample (MACs x weight bits x activation bits)      |

Byte budgets cover the whole model: quantized weights with their metadata plus everything
left in floating point (stored as fp16).
"""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict

from ..errors import BudgetError

__all__ = ["MAX_BOPS", "MAX_BPW", "MAX_BYTES", "Budget", "Resource", "format_bops", "format_bytes"]

Resource = Literal["bytes", "bops"]

# A number as people write it: 12, 0.3, .5, 1e-3, 2.5E9 (no sign: budgets are positive).
_NUMBER = r"(?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)"
_BPW = re.compile(rf"^{_NUMBER}\s*(?:bpw|bits?(?:/w| per weight)?)$", re.IGNORECASE)
_PERCENT = re.compile(rf"^{_NUMBER}\s*%$")
_BOPS = re.compile(rf"^{_NUMBER}\s*(?P<prefix>[kmgtp]?)\s*bops?$", re.IGNORECASE)
_BYTES = re.compile(rf"^{_NUMBER}\s*(?P<unit>[kmgtp]?i?b|bytes?)$", re.IGNORECASE)
_BOPS_PREFIX = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}
_DECIMAL = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}
_BINARY = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "p": 2**50}

# Beyond these a budget describes no model this tool can plan: refused, not silently capped.
MAX_BYTES = 10**18  # one exabyte
MAX_BOPS = 10**18
MAX_BPW = 64.0

_HELP = (
    "write a size like 12MB, 300MiB or 0.3GB, bits per weight like 3.5bpw,"
    " a share of the fp16 size like 25%, or 40GBOPs"
)


def _bytes(number: float, unit: str) -> float:
    unit = unit.lower()
    if unit.startswith("byte"):
        return number
    prefix = unit[:-1].rstrip("i")
    return number * (_BINARY[prefix] if "i" in unit else _DECIMAL[prefix])


class Budget(BaseModel):
    """A parsed budget.

    Attributes:
        kind: `bytes` (whole model), `bpw` (bits per quantizable weight), `fraction` (of the
            fp16 model size) or `bops` (bit operations per sample).
        value: bytes, bits, a fraction in (0, 1], or BOPs.
        text: what the user wrote.

    Example:
        >>> Budget.parse("12MB").value, Budget.parse("3.5bpw").kind, Budget.parse("25%").value
        (12000000.0, 'bpw', 0.25)
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    kind: Literal["bytes", "bpw", "fraction", "bops"]
    value: float
    text: str

    @classmethod
    def parse(cls, text: str | Budget) -> Budget:
        """Read a budget string; raises `BudgetError` naming the accepted forms."""
        if isinstance(text, Budget):
            return text
        raw = str(text).strip()
        if not raw:
            raise BudgetError(f"empty budget: {_HELP}")
        if m := _BPW.match(raw):
            kind, value, most = "bpw", float(m["num"]), MAX_BPW
        elif m := _PERCENT.match(raw):
            kind, value, most = "fraction", float(m["num"]) / 100, 1.0
        elif m := _BOPS.match(raw):
            kind, value, most = "bops", float(m["num"]) * _BOPS_PREFIX[m["prefix"].lower()], MAX_BOPS
        elif m := _BYTES.match(raw):
            kind, value, most = "bytes", _bytes(float(m["num"]), m["unit"]), MAX_BYTES
        elif re.fullmatch(_NUMBER, raw, re.IGNORECASE):
            raise BudgetError(f"budget {raw!r} has no unit: {_HELP}")
        else:
            raise BudgetError(f"cannot read budget {raw!r}: {_HELP}")
        if value <= 0:
            raise BudgetError(f"budget {raw!r} must be positive: {_HELP}")
        if kind == "fraction" and value > most:
            raise BudgetError(f"budget {raw!r} is more than the whole fp16 model; use at most 100%")
        if not math.isfinite(value) or value > most:
            shown = f"{most:g} bits per weight" if kind == "bpw" else format_bops(most) if kind == "bops" else "1 EB"
            raise BudgetError(f"budget {raw!r} is larger than any model can use (at most {shown}); write a real budget")
        if kind == "bytes" and value < 1:
            raise BudgetError(f"budget {raw!r} is less than one byte; write a size like 12MB")
        return cls(kind=kind, value=value, text=raw)

    @property
    def resource(self) -> Resource:
        return "bops" if self.kind == "bops" else "bytes"

    def limit(self, *, fp16_bytes: int, fixed_bytes: int, quantizable_params: int) -> int:
        """The solver's limit for this budget's resource.

        For byte-like budgets: bytes available to the quantizable weights (the whole-model
        limit minus the fixed part); for `bpw`, `bits x params / 8`. For BOPs: BOPs per sample.
        """
        if self.kind == "bytes":
            return math.floor(self.value) - fixed_bytes
        if self.kind == "fraction":
            return math.floor(self.value * fp16_bytes) - fixed_bytes
        if self.kind == "bpw":
            return math.floor(self.value * quantizable_params / 8)
        return math.floor(self.value)

    def describe_minimum(self, min_limit: int, *, fp16_bytes: int, fixed_bytes: int, quantizable_params: int) -> str:
        """The smallest budget of this kind that admits a solver limit of `min_limit`."""
        if self.kind == "bytes":
            return format_bytes(min_limit + fixed_bytes)
        if self.kind == "fraction":
            return f"{100 * (min_limit + fixed_bytes) / fp16_bytes:.2f}%"
        if self.kind == "bpw":
            return f"{8 * min_limit / quantizable_params:.3f}bpw"
        return format_bops(min_limit)

    def __str__(self) -> str:
        return self.text


def parse_size(text: str | int | float, option: str = "--max-memory") -> int:
    """A memory size (`4GB`, `1500MiB`, or a number of bytes) as bytes; `BudgetError` naming
    `option` when it is not one."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        raw = str(text).strip()
        m = _BYTES.match(raw)
        if m is None:
            raise BudgetError(f"{option} {raw!r} is not a size; write one like 4GB or 1500MB")
        value = _bytes(float(m["num"]), m["unit"])
    if not math.isfinite(value) or not 1 <= value <= MAX_BYTES:
        raise BudgetError(f"{option} {text!r} is not a usable size; write one like 4GB or 1500MB")
    return int(value)


def format_bytes(n: float) -> str:
    """Decimal units, as budgets are written: `11.98 MB`."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_bops(n: float) -> str:
    for unit, size in (("PBOPs", 1e15), ("TBOPs", 1e12), ("GBOPs", 1e9), ("MBOPs", 1e6), ("kBOPs", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} BOPs"
