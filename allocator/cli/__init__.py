"""The `allocator` command line: one module per command, shared options declared once in
`options`, output rendered by `report`.

    allocator profile | solve | evaluate | apply | generate | convert | frontier | serve | version

Every failure ends in one line on stderr and an exit status:

| status | meaning |
|---|---|
| 0 | done (also when stdout was closed early, as by `| head`: files are written first) |
| 1 | a bug in allocator: the line says so; `--debug` shows the traceback to report |
| 2 | the input cannot be used: bad option, budget, file or model, no plan fits, I/O error |
| 130 | interrupted (Ctrl-C); the line says whether anything was written |

`--debug` (anywhere on the line) prints the traceback of any failure before its line. Output
files are written atomically, only when their command succeeds, and never over an input.
This module stays light: the commands (and torch, where they need it) load inside `main`, so
an interrupt at any moment is handled.
"""

import errno
import os
import sys
import traceback

__all__ = ["EXIT_BUG", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USER", "main"]

EXIT_OK, EXIT_BUG, EXIT_USER, EXIT_INTERRUPTED = 0, 1, 2, 130


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `allocator` command; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    stdout = _PipeSafe(sys.stdout)
    sys.stdout = stdout
    written: list[str] = []
    try:
        return _run(args, written)
    except KeyboardInterrupt as e:
        return _fail(e, _interrupted(written), EXIT_INTERRUPTED, debug)
    except BaseException as e:  # every failure becomes one line and a status
        return _fail(e, *_describe(e), debug)
    finally:
        if stdout.broken:  # the reader went away: later flushes (at exit) must not complain
            _silence_stdout()


def _run(args: list[str], written: list[str]) -> int:
    import warnings

    import typer

    from . import apply, convert, evaluate, frontier, generate, profile, serve, solve  # noqa: F401 - register commands
    from .app import app, report

    report.written = written
    warnings.showwarning = lambda message, *rest, **kw: report.warn(str(message))
    try:
        code = typer.main.get_command(app).main(args=args, prog_name="allocator", standalone_mode=False)
    except typer.Abort as e:  # click's word for an interrupt
        raise KeyboardInterrupt from e
    if code == EXIT_INTERRUPTED:  # typer turns an interrupt into this status, silently
        raise KeyboardInterrupt
    return code if isinstance(code, int) else EXIT_OK


def _describe(e: BaseException) -> tuple[str, int]:
    """The one line and exit status of a failure."""
    import typer

    from ..errors import USER_ERRORS

    if isinstance(e, SystemExit):
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else EXIT_USER
        return ("" if code == 0 else str(e.code)), code
    if isinstance(e, typer.TyperException):  # bad usage: an unknown option, a value out of range, ...
        ctx = getattr(e, "ctx", None)  # the message already names the option ("Invalid value for '--gap'")
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        return f"{message.rstrip('.')}{where}", EXIT_USER
    if isinstance(e, USER_ERRORS):
        return str(e), EXIT_USER
    if isinstance(e, OSError):
        return _os_error(e), EXIT_USER
    if isinstance(e, MemoryError):
        return "out of memory; use fewer or shorter calibration samples, or a machine with more memory", EXIT_USER
    return (
        f"unexpected {type(e).__name__}: {e}; this is a bug in allocator, please report it with the"
        " traceback that --debug prints",
        EXIT_BUG,
    )


def _os_error(e: OSError) -> str:
    """`cannot write out/plan.json: No space left on device` and the like."""
    what = {errno.ENOSPC: "disk full", errno.EROFS: "read-only file system"}.get(e.errno or 0, e.strerror or str(e))
    where = f" {e.filename}" if e.filename else ""
    fixes = {
        errno.ENOENT: "check the path",
        errno.EACCES: "choose a location you may write to",
        errno.EPERM: "choose a location you may write to",
        errno.EISDIR: "name a file, not a folder",
        errno.ENOSPC: "free some space or write elsewhere",
        errno.EROFS: "write elsewhere",
    }
    fix = fixes.get(e.errno or 0)
    return f"{what}:{where}" + (f"; {fix}" if fix else "")


def _interrupted(written: list[str]) -> str:
    if not written:
        return "interrupted; nothing written"
    return f"interrupted; written before the interrupt: {', '.join(written)}"


def _fail(e: BaseException, line: str, code: int, debug: bool) -> int:
    if debug and code != EXIT_OK:
        traceback.print_exception(e, file=sys.stderr)
    if line and code != EXIT_OK:
        print(f"error: {line}" if code != EXIT_INTERRUPTED else line, file=sys.stderr, flush=True)
    return code


class _PipeSafe:
    """stdout that stops writing, instead of failing, once its reader is gone (`| head`): the
    command finishes its work and its files."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self.stream.write(text)
            except BrokenPipeError:
                self.broken = True
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self.broken = True

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _silence_stdout() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.__stdout__.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    finally:
        os.close(devnull)
