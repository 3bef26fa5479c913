"""Files that are never half-written, and reading pydantic file models with one-line errors."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

__all__ = ["atomic_write_bytes", "atomic_write_text", "load_json_model"]

M = TypeVar("M", bound=BaseModel)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename.

    A crash or an exception leaves either the old file or the new one, never a mix, and no
    temporary file behind.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it normal permissions
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def load_json_model(
    cls: type[M], path: str | os.PathLike[str], *, what: str, format_name: str, error: type[Exception]
) -> M:
    """Read a JSON file into the pydantic model `cls`.

    Every failure (missing, unreadable, truncated, wrong kind of file, schema violation) raises
    `error` with one line naming the file, the problem and the fix.
    """
    p = Path(path)
    try:
        raw = p.read_text()
    except FileNotFoundError:
        raise error(f"{what} file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {what} file {p}: {e}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise error(
            f"{p} is not valid JSON ({e.msg} at line {e.lineno}); it may be truncated — recreate the {what}"
        ) from None
    if not isinstance(data, dict) or data.get("format") != format_name:
        raise error(f'{p} is not an allocator {what} file (expected "format": "{format_name}")')
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        raise error(f"{p} is not a valid {what}: {loc}: {err['msg']} — recreate the {what}") from None
