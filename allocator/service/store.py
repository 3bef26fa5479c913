"""Uploaded profiles on disk, content-addressed, with a small in-memory cache."""

import hashlib
import re
import threading
from collections import OrderedDict
from pathlib import Path

from profilers.files import atomic_write_text
from profilers.types import ProfileTable

from .schemas import PROFILE_ID

__all__ = ["ProfileStore"]


class ProfileStore:
    """Profiles on disk under `root/profiles/<sha256>.json`, with a small in-memory cache.

    The id is the SHA-256 of the profile's canonical JSON, so the same profile uploaded twice
    (or after a restart) gets the same id and one file. Files are written atomically.
    """

    def __init__(self, root: str | Path, *, cache_size: int = 16):
        self.folder = Path(root) / "profiles"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._cache: OrderedDict[str, ProfileTable] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def put(self, table: ProfileTable) -> str:
        text = table.model_dump_json()
        key = hashlib.sha256(text.encode("utf-8")).hexdigest()
        path = self.folder / f"{key}.json"
        if not path.exists():
            atomic_write_text(path, text)
        self._remember(key, table)
        return key

    def get(self, key: str) -> ProfileTable:
        """The stored profile; `KeyError` when there is none with this id."""
        if not re.fullmatch(PROFILE_ID, key):  # never build a path from anything else
            raise KeyError(key)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        path = self.folder / f"{key}.json"
        if not path.is_file():
            raise KeyError(key)
        table = ProfileTable.load(path)
        self._remember(key, table)
        return table

    def _remember(self, key: str, table: ProfileTable) -> None:
        with self._lock:
            self._cache[key] = table
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
