"""The `allocator` typer application and the console every command prints to."""

from typing import Annotated

import typer
from rich.console import Console

from .. import __version__
from .report import Reporter

__all__ = ["app", "report"]

app = typer.Typer(
    name="allocator",
    help="Budgeted mixed-precision, multi-term post-training quantization for PyTorch models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
_out = Console()
if not _out.is_terminal:  # piped or captured: keep table rows on one line
    _out = Console(width=140)
report = Reporter(_out, Console(stderr=True))


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="On any failure, print the traceback before the one-line error.")
    ] = False,
) -> None:
    """Budgeted mixed-precision, multi-term post-training quantization for PyTorch models."""


@app.command()
def version() -> None:
    """Print the version."""
    report.line(__version__)
