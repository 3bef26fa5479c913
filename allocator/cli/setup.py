"""What several commands do first: load the model and its data, check a profile or plan
against the model's weights, and find the plan a command is about."""

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import USER_ERRORS, AllocatorError
from .app import report
from .options import DataOptions

__all__ = ["Setup", "check_outputs", "check_profile", "check_weights", "load_setup", "model_and_plan"]


@dataclass
class Setup:
    """A loaded model and its calibration and held-out data."""

    loaded: Any  # sources.models.LoadedModel
    data: Any  # sources.data.Data

    @property
    def calib(self) -> list:
        return self.data.calib


def load_setup(model: str | None, options: DataOptions, *, lazy: bool = False) -> Setup:
    """Load `model` (the default model when None; `lazy`: a causal LM read block by block) and
    split its data as `options` say."""
    from ..sources import DEFAULT_MODEL
    from ..sources.data import load_data
    from ..sources.models import load_model

    loaded = load_model(model or DEFAULT_MODEL, lazy=lazy)
    found = load_data(loaded, options.data, calibration=options.calibration, seed=options.seed,
                      max_length=options.max_length, batch_size=options.batch_size)  # fmt: skip
    detail = f", {found.max_length} tokens" if found.unit == "documents" else ""
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


def check_profile(table: Any, loaded: Any, profile_file: Path) -> None:
    """Refuse a profile made for another model: other weights, or other layer names or shapes."""
    from ..quantized.checks import check_profile_fits_model

    check_weights(table.model_fingerprint, loaded, profile_file, "run allocator profile again")
    try:
        check_profile_fits_model(loaded.model, table)
    except USER_ERRORS as e:
        raise AllocatorError(f"{profile_file} does not fit {loaded.name}: {e}") from None


def one_model(positional: str | None, option: str | None) -> str | None:
    """The model named positionally (`allocator profile MODEL`) or with `--model` (either, as on
    every command); both only when they agree."""
    if positional is not None and option is not None and positional != option:
        raise AllocatorError(f"two models named: {positional!r} and --model {option!r}; name one")
    return option if option is not None else positional


def model_and_plan(model: str | None, plan_file: Path | None, option: str | None = None) -> tuple[str | None, Path]:
    """`allocator CMD PLAN.json` (no model) reads the model from the plan; `--model` (`option`)
    names it as the positional MODEL does, the one positional then being the plan."""
    if option is not None:
        if plan_file is None:
            return option, Path(model) if model is not None else Path("plan.json")
        return one_model(model, option), plan_file
    if plan_file is None:
        if model is not None and model.endswith(".json"):
            return None, Path(model)
        return model, Path("plan.json")
    return model, plan_file


def check_outputs(outputs: dict[str, Path | None], inputs: Sequence[str | Path | None]) -> None:
    """Refuse, before any work is done, an output that is one of the inputs, a folder, or in a
    place that cannot be written (outputs are written atomically at the end)."""
    existing = [Path(p) for p in inputs if p is not None and Path(p).exists()]
    for option, out in outputs.items():
        if out is None:
            continue
        if out.is_dir():
            raise AllocatorError(f"{option} {out} is a folder; name the file to write")
        for source in existing:
            if _same_file(out, source):
                raise AllocatorError(
                    f"{option} {out} is also an input of this command; write the result to another file"
                )
        parent = out.absolute().parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise AllocatorError(f"cannot write {out}: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
            raise AllocatorError(f"cannot write {out}: permission denied; choose a location you may write to")


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()
