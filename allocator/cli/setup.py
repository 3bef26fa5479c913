"""What several commands do first: load the model and its data, check a profile or plan
against the model's weights, and find the plan a command is about."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AllocatorError
from .app import report
from .options import DataOptions

__all__ = ["Setup", "check_weights", "load_setup", "model_and_plan"]


@dataclass
class Setup:
    """A loaded model and its calibration and held-out data."""

    loaded: Any  # sources.models.LoadedModel
    data: Any  # sources.data.Data

    @property
    def calib(self) -> list:
        return self.data.calib


def load_setup(model: str | None, options: DataOptions) -> Setup:
    """Load `model` (the default model when None) and split its data as `options` say."""
    from ..sources.data import load_data
    from ..sources.models import DEFAULT_MODEL, load_model

    loaded = load_model(model or DEFAULT_MODEL)
    found = load_data(loaded, options.data, calibration=options.calibration, seed=options.seed,
                      max_length=options.max_length, batch_size=options.batch_size)  # fmt: skip
    detail = f", {options.max_length} tokens" if found.unit == "documents" else ""
    report.line(
        f"model {loaded.name} ({loaded.kind}); calibration: {found.n_calib} {found.unit} of {found.source}{detail}"
    )
    return Setup(loaded, found)


def check_weights(fingerprint: str, loaded: Any, made_file: Path, fix: str) -> None:
    """Refuse a profile or plan made for other weights than the loaded model's."""
    from profilers.layers import fingerprint_model

    if fingerprint_model(loaded.model) != fingerprint:
        raise AllocatorError(
            f"{made_file} was made for different weights than {loaded.name}'s (the model changed); {fix}"
        )


def model_and_plan(model: str | None, plan_file: Path | None) -> tuple[str | None, Path]:
    """`allocator CMD PLAN.json` (no model) reads the model from the plan."""
    if plan_file is None:
        if model is not None and model.endswith(".json"):
            return None, Path(model)
        return model, Path("plan.json")
    return model, plan_file
