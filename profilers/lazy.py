"""Package namespaces that import their members on first use.

`profilers` and `allocator` re-export names from modules that need torch; with lazy exports,
importing a torch-free part (the file types, the budget, the planning client) stays torch-free.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: `exports[name]` is the submodule defining `name`.

    Example:
        >>> __getattr__ = lazy_exports(__name__, {"Choice": ".types"})  # doctest: +SKIP
    """
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value  # later lookups skip this function
        return value

    return __getattr__
