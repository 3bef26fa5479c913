"""The `allocator` command line: one module per command, shared options declared once in
`options`, output rendered by `report`.

    allocator profile | solve | evaluate | apply | convert | frontier | serve | version

Errors a user can fix print one line (`error: ...`) and exit with status 2; an output file is
written only when its command succeeds, and atomically.
"""

import sys
import warnings

from .. import __version__
from ..errors import USER_ERRORS
from . import apply, convert, evaluate, frontier, profile, serve, solve  # noqa: F401 - each registers its command
from .app import app, report

__all__ = ["app", "main"]


@app.command()
def version() -> None:
    """Print the version."""
    report.line(__version__)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    report.warn(str(message))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `allocator` command; returns the exit status."""
    warnings.showwarning = _show_warning
    try:
        app(args=argv, prog_name="allocator")
    except USER_ERRORS as e:
        report.err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        report.err.print("interrupted")
        return 130
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
