"""Handing memory the process freed back to the OS."""

from __future__ import annotations

import ctypes
from typing import Any

__all__ = ["release_freed_memory"]


def release_freed_memory() -> None:
    """Hand memory freed by the last segment back to the OS (glibc keeps freed blocks of a few
    MB in its heap, where the next segment's tensors of other sizes cannot reuse them: the
    resident size then grows segment by segment). A no-op where glibc is not the allocator."""
    global _trim
    if _trim is None:
        try:
            _trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _trim = False
    if _trim:
        _trim(0)


_trim: Any = None
