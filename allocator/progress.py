"""Progress bars with an ETA for long work (profiling, measuring), fed by the
`(stage, done, total)` callbacks the profilers and the evaluation call."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["ProgressFn", "progress_bars", "terminal_progress"]

ProgressFn = Callable[[str, int, int], None]


@contextmanager
def progress_bars(console: Console, enabled: bool = True) -> Iterator[ProgressFn]:
    """One bar per stage (elapsed time and ETA), on `console`, gone when done; a no-op when disabled."""
    if not enabled:
        yield lambda stage, done, total: None
        return
    columns = (
        TextColumn("{task.description:>18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update


@contextmanager
def terminal_progress(progress: ProgressFn | None) -> Iterator[ProgressFn]:
    """`progress` when given; otherwise bars on stderr when it is a terminal, else nothing."""
    if progress is not None:
        yield progress
        return
    with progress_bars(Console(stderr=True), enabled=sys.stderr.isatty()) as update:
        yield update
