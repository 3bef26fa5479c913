"""The `Plan`: one choice per layer, with what the plan predicts and how it was solved.

A plan is a file (JSON, versioned, keyed by layer name). The same profile, budget and solver
settings give the same file byte for byte: nothing in it depends on the clock.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from profilers.files import atomic_write_text, load_json_model
from profilers.types import Choice, DataSplit, decode_indices

from ..errors import PlanError
from .budget import Budget

__all__ = ["PLAN_FORMAT", "Constraints", "LayerPlan", "Plan", "Predicted", "SolverReport", "UniformPoint"]

PLAN_FORMAT = "allocator.plan"


class LayerPlan(BaseModel):
    """The choice for one weight and its share of the prediction."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    choice: Choice
    shape: tuple[int, ...] = Field(description="weight shape the plan was made for")
    aliases: tuple[str, ...] = Field(default=(), description="other modules sharing this weight")
    bytes: int = Field(ge=0)
    bops: int = Field(ge=0)
    loss: float = Field(ge=0)
    extra_rows: str | None = Field(
        default=None,
        description="fractional choices: the rows carrying the extra term (profilers.specs.encode_indices)",
    )

    def rows_with_extra_term(self) -> np.ndarray:
        """Sorted row indices that carry the extra term (empty for whole-term choices).

        Raises:
            PlanError: the stored rows are corrupt or do not match the choice.
        """
        if not self.choice.extra:
            return np.zeros(0, dtype=np.int64)
        n_rows = self.shape[0]
        try:
            rows = decode_indices(self.extra_rows or "", limit=n_rows)
        except ValueError as e:
            raise PlanError(f"the plan's extra-term rows for a {self.choice.label} layer are unreadable: {e}") from None
        if len(rows) != self.choice.extra_rows(n_rows) or len(np.unique(rows)) != len(rows):
            raise PlanError(
                f"the plan lists {len(rows)} extra-term rows for {self.choice.label} on {n_rows} rows; "
                f"expected {self.choice.extra_rows(n_rows)} distinct rows — recreate the plan"
            )
        return rows


class Predicted(BaseModel):
    """Totals the plan predicts for the whole model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bytes: int = Field(description="whole model file: quantized weights, metadata, fp16 rest, header allowance")
    quantized_bytes: int = Field(description="the planned weights only")
    file_overhead: int = Field(default=0, description="header allowance included in `bytes` (an upper bound)")
    bpw: float = Field(description="bits per planned weight, metadata included")
    bops: int = Field(description="bit operations per sample through planned weights")
    loss: float = Field(description="sum of per-layer estimated losses")


class Constraints(BaseModel):
    """What the plan had to respect beyond its budgets (recorded so the plan can be reproduced)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    pins: tuple[tuple[str, str], ...] = Field(default=(), description="(layer pattern, choice label)")
    forbid: tuple[tuple[str, str], ...] = Field(default=(), description="(layer pattern, choice-label pattern)")
    keep: tuple[str, ...] = Field(default=(), description="layer patterns kept in fp16")
    device_bits: int | None = Field(default=None, ge=2, le=8, description="no term wider than this")
    max_loss: float | None = Field(default=None, ge=0, description="lossless mode: the smallest plan within this loss")


class SolverReport(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str = Field(description="solver requested")
    backend: str = Field(description="backend(s) that produced the plan")
    status: Literal["optimal", "feasible", "timeout"]
    objective: float = Field(description="value minimised: summed loss, or bytes in lossless mode")
    objective_is: Literal["loss", "bytes"] = "loss"
    lower_bound: float
    gap: float = Field(description="relative optimality gap, proven")
    gap_limit: float = Field(default=1e-6, description="gap accepted as optimal")
    time_limit: float = Field(default=10.0, description="seconds allowed for exact work")


class UniformPoint(BaseModel):
    """One uniform setting (the same choice for every planned layer), priced by the profile."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    choice: Choice
    bytes: int
    bpw: float
    bops: int
    loss: float
    fits: bool


class Plan(BaseModel):
    """A quantization plan for one model.

    Example:
        >>> plan = Plan.load("plan.json")  # doctest: +SKIP
        >>> plan.layers["encoder.layer.0.attention.self.query"].choice.label  # doctest: +SKIP
        'int4-g64'
    """

    model_config = ConfigDict(extra="forbid")

    format: Literal["allocator.plan"] = PLAN_FORMAT
    version: Literal[1, 2] = 2  # 2: GGUF plans (`target_format`, `Choice.ggml`); 1 is read too
    model_name: str = ""
    model_fingerprint: str
    data_fingerprint: str
    data: DataSplit | None = Field(default=None, description="calibration split the plan was profiled on")
    profiler: str
    target_format: Literal["native", "gguf"] = Field(
        default="native",
        description="what `apply` writes: allocator's packed safetensors file, or a GGUF file of llama.cpp block types"
        " (its byte budget is the file's)",
    )
    method: Literal["rtn", "gptq", "gptq-act"] = Field(default="rtn", description="rounding the plan was scored for")
    sequential: bool = Field(
        default=False,
        description="GPTQ calibrates each block on the quantized blocks before it (the profile priced FP inputs)",
    )
    scored_batches: int | None = Field(
        default=None,
        ge=1,
        description="calibration batches the scores read, evenly spaced (None: all); GPTQ's H reads them all",
    )
    refine_steps: int = Field(
        default=0,
        ge=0,
        description="block reconstruction after the rounding: tuning steps per block (0: none; not in the profile)",
    )
    tune_steps: int = Field(
        default=0,
        ge=0,
        description="end-to-end tuning of the scales on the output divergence, after the rounding and any block"
        " reconstruction: steps (0: none; not in the profile)",
    )
    loss_units: str
    budgets: tuple[Budget, ...]
    limits: dict[str, int] = Field(description="per resource, the limit on the planned weights")
    constraints: Constraints = Field(default_factory=Constraints)
    fixed_bytes: int = Field(ge=0, description="bytes outside the planned weights (fp16; a GGUF plan: as the source)")
    kept_fp16: tuple[str, ...] = ()
    ties: tuple[tuple[str, ...], ...] = ()
    layers: dict[str, LayerPlan]
    predicted: Predicted
    solver: SolverReport
    uniform: tuple[UniformPoint, ...] = Field(default=(), description="every uniform setting, best first")

    def best_uniform(self) -> UniformPoint | None:
        """The uniform setting to beat: the one with the least predicted loss that fits every
        budget, or in lossless mode the smallest one whose predicted loss meets `max_loss`."""
        fitting = [u for u in self.uniform if u.fits]
        if self.constraints.max_loss is not None:
            meeting = [u for u in fitting if u.loss <= self.constraints.max_loss]
            return min(meeting, key=lambda u: (u.bytes, u.loss)) if meeting else None
        return min(fitting, key=lambda u: u.loss) if fitting else None

    def choice_summary(self) -> dict[str, tuple[int, int, int]]:
        """Per choice label: (layers, weights, bytes), most weights first."""
        rows: dict[str, list[int]] = {}
        for lp in self.layers.values():
            row = rows.setdefault(lp.choice.label, [0, 0, 0])
            numel = 1
            for d in lp.shape:
                numel *= d
            row[0] += 1
            row[1] += numel
            row[2] += lp.bytes
        return {k: (v[0], v[1], v[2]) for k, v in sorted(rows.items(), key=lambda kv: -kv[1][1])}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan as JSON, atomically."""
        return atomic_write_text(path, self.model_dump_json(indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """Read a plan; a missing, truncated or foreign file raises `PlanError`."""
        return load_json_model(cls, path, what="plan", format_name=PLAN_FORMAT, error=PlanError)
