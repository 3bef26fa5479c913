"""The estimators by name, and building one with its settings."""

from __future__ import annotations

import inspect
from typing import Any

from ..types import ProfileError
from .base import Profiler
from .fisher import FisherProfiler
from .hessian import HessianProfiler
from .measured import MeasuredProfiler

__all__ = ["PROFILERS", "make_profiler"]

PROFILERS: dict[str, type[Profiler]] = {
    FisherProfiler.name: FisherProfiler,
    HessianProfiler.name: HessianProfiler,
    MeasuredProfiler.name: MeasuredProfiler,
}



def make_profiler(name: str, **settings: Any) -> Profiler:
    """A profiler by name (`fisher`, `hessian`, `measured`) with its settings; settings a
    profiler does not take are ignored (e.g. `draws` for `measured`)."""
    if name not in PROFILERS:
        raise ProfileError(f"unknown profiler {name!r}; choose one of {', '.join(PROFILERS)}")
    cls = PROFILERS[name]
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in settings.items() if k in accepted and v is not None})

