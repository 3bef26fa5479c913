"""llama.cpp for the benchmarks: its tools (`llama-quantize`, `llama-imatrix`, `llama-perplexity`,
`llama-bench`) and its quantizers (`ggml_quantize_chunk` through ctypes), built from the sources
that the `llama-cpp-python` sdist on PyPI vendors.

A prerequisite of the GGUF benchmarks, not of the project: nothing under `allocator/` runs
llama.cpp. The build (cmake + a C++ compiler, about 8 minutes on 2 cores) goes to
`out/llama.cpp/` unless `LLAMA_CPP_DIR` names a folder holding a built tree (`build/bin/...`).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

__all__ = ["TOOLS", "ggml_quantize", "llama_cpp_root", "tool"]

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench")
_DEFAULT = Path(__file__).resolve().parent.parent / "out" / "llama.cpp"


def llama_cpp_root() -> Path:
    """A llama.cpp source tree with its tools built (building it first when needed)."""
    root = Path(os.environ.get("LLAMA_CPP_DIR", _DEFAULT))
    if all((root / "build" / "bin" / t).exists() for t in TOOLS):
        return root
    if not (root / "CMakeLists.txt").exists():
        _unpack_sources(root)
    print(f"building llama.cpp in {root} (about 8 minutes on 2 cores)", file=sys.stderr, flush=True)
    subprocess.run(["cmake", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF"], cwd=root, check=True, capture_output=True)  # fmt: skip
    jobs = str(os.cpu_count() or 2)
    subprocess.run(["cmake", "--build", "build", "-j", jobs, "--target", *TOOLS], cwd=root, check=True)
    return root


def _unpack_sources(root: Path) -> None:
    """The llama.cpp sources vendored by the llama-cpp-python sdist, unpacked into `root`."""
    cache = root.parent / "llama-cpp-python-sdist"
    cache.mkdir(parents=True, exist_ok=True)
    if not list(cache.glob("llama_cpp_python-*.tar.gz")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "--dest", str(cache), "llama-cpp-python"], check=True)  # fmt: skip
    sdist = sorted(cache.glob("llama_cpp_python-*.tar.gz"))[-1]
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        tar.extractall(cache, filter="data")
    if root.exists():
        shutil.rmtree(root)
    shutil.move(str(cache / top / "vendor" / "llama.cpp"), root)


def tool(name: str) -> Path:
    """The path of one built tool."""
    return llama_cpp_root() / "build" / "bin" / name


_lib: ctypes.CDLL | None = None


def _ggml() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(str(llama_cpp_root() / "build" / "bin" / "libggml-base.so"))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        _lib = lib
    return _lib


def ggml_quantize(w: np.ndarray, type_id: int, row_bytes: int, imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's own quantization of a float32 `[rows, cols]` matrix to type `type_id`
    (`gguf.GGMLQuantizationType`), with an importance per column (as `llama-quantize --imatrix`
    passes it) or without: the bytes `[rows, row_bytes]`."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    rows, cols = w.shape
    out = np.zeros((rows, row_bytes), dtype=np.uint8)
    imat = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    written = _ggml().ggml_quantize_chunk(type_id, w.ctypes.data, out.ctypes.data, 0, rows, cols,
                                          None if imat is None else imat.ctypes.data)  # fmt: skip
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out
