"""Causal LMs read block by block: the float copy of the whole model is never built.

The architecture is built from the config with its weights unwritten (address space, not
memory); the stem and head (embedding, final norm, output head) are read at once, and each
repeated block's tensors are read from the file when a stage uses the block
(`profilers.resident.LazyBlocks`), then dropped when another block needs the room:

- a Hugging Face folder: each tensor read from its safetensors file with a plain read;
- a GGUF file: memory-mapped by `gguf.GGUFReader`, each tensor dequantized on demand, with
  transformers' own GGUF-to-transformers names and per-architecture fixes (q/k row order of
  Llama models, Gemma's norm offsets), so every value equals what `from_pretrained` builds.
"""

from __future__ import annotations

import functools
import json
import mmap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from profilers.blocks import blocks_holding
from profilers.resident import LazyBlocks

from ..errors import ModelError

__all__ = [
    "DEFAULT_RESIDENT_BLOCKS", "BlockFile", "NotReadableByBlock", "lazy_from_folder", "lazy_from_gguf", "read_by_block",
]  # fmt: skip

DEFAULT_RESIDENT_BLOCKS = 2  # blocks kept in memory beyond those a stage holds


class NotReadableByBlock(ModelError):
    """The model cannot be read block by block (no safetensors files, no chain of blocks): the
    caller loads it whole instead."""


class _SafetensorsFiles:
    """The tensors of a folder's safetensors files by name, each read into its own memory.

    Read with plain file reads, not memory-mapped: the `safetensors` package maps the file and
    hands out views of it, whose pages stay in the process's resident memory while the file is
    open (and a write into one is seen by the next read). The format is an 8-byte header length,
    a JSON header (dtype, shape and byte range per tensor) and the data."""

    _DTYPES: ClassVar[dict[str, torch.dtype]] = {
        "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool,
    }  # fmt: skip

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = [p.name for p in sorted(folder.glob("*.safetensors"))]
        if not files:
            raise NotReadableByBlock(f"{folder} holds no .safetensors file to read block by block")
        self.entries: dict[str, tuple[Path, int, dict[str, Any]]] = {}
        for f in files:
            path = folder / f
            try:
                with path.open("rb") as fh:
                    size = int.from_bytes(fh.read(8), "little")
                    header = json.loads(fh.read(size))
            except (OSError, ValueError) as e:
                raise ModelError(f"{path} is not a readable safetensors file ({e}); save the model again") from None
            header.pop("__metadata__", None)
            for name, entry in header.items():
                self.entries[name] = (path, 8 + size, entry)

    def names(self) -> set[str]:
        return set(self.entries)

    def get(self, name: str) -> Tensor:
        path, start, entry = self.entries[name]
        dtype = self._DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ModelError(f"{path}: tensor {name} has dtype {entry['dtype']}, which allocator does not read")
        begin, end = entry["data_offsets"]
        data = bytearray(end - begin)
        with path.open("rb") as fh:
            fh.seek(start + begin)
            if fh.readinto(data) != len(data):
                raise ModelError(f"{path} is truncated (tensor {name}); save the model again")
        return torch.frombuffer(data, dtype=dtype).reshape(entry["shape"])


class _GgufTensors:
    """The tensors of a GGUF file under transformers' parameter names, dequantized on demand."""

    def __init__(self, path: Path, model: nn.Module) -> None:
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )

        from .gguf import gguf_reader

        self.reader = gguf_reader(path)
        arch = bytes(self.reader.fields["general.architecture"].parts[-1]).decode()
        # The processors read the model's config under transformers' names (heads, key/value heads).
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
        with _one_name_map():
            self.to_hf = get_gguf_hf_weights_map(model, self.processor)
        tensors = {t.name: t for t in self.reader.tensors}
        self.tensors = {self.to_hf[n]: t for n, t in tensors.items() if n in self.to_hf}

    def names(self) -> set[str]:
        return set(self.tensors)

    def get(self, name: str) -> Tensor:
        from gguf import dequantize

        t = self.tensors[name]
        weights = np.array(dequantize(t.data, t.tensor_type), copy=True)  # F32/F16 tensors are views of the map
        out = self.processor.process(weights=weights, name=t.name, tensor_key_mapping=self.to_hf,
                                     parsed_parameters={"tensors": {}})  # fmt: skip
        self._forget(t.data_offset, t.n_bytes)
        return torch.from_numpy(np.ascontiguousarray(out.weights))

    def _forget(self, offset: int, size: int) -> None:
        """Drop the file's pages just read from this process's resident memory (they stay in the
        page cache): else every block ever read stays counted against the process."""
        mm = getattr(self.reader.data, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise"):
            return
        start = offset - offset % mmap.PAGESIZE
        mm.madvise(mmap.MADV_DONTNEED, start, offset + size - start)


class BlockFile:
    """Reads a block's tensors from the model file (`LazyBlocks`'s `read`): `reader(k)` -> block
    `k`'s tensors by parameter name inside the block.

    It pickles as the file's absolute path and the tensors' names, so a worker process
    (`profilers.estimators.distributed`, `allocator.quantized.distributed`) reads the blocks it
    scores or rounds from the file itself
    (`block(k)`: the block module with its weights); each process opens a file once (a GGUF
    file's metadata is parsed, and the model built without weights, on the first read)."""

    def __init__(self, path: Path, auto_class: str, prefixes: list[str], names: list[list[str]], files: Any) -> None:
        self.path, self.auto_class, self.prefixes, self.names = path.resolve(), auto_class, prefixes, names
        self._files = files

    def __call__(self, k: int) -> dict[str, Tensor]:
        if self._files is None:  # unpickled in another process: the file opened there once
            self._files = self._opened()[0]
        return {n: self._files.get(self.prefixes[k] + n) for n in self.names[k]}

    def block(self, k: int) -> nn.Module:
        """Block `k` with its weights read from the file, for a process that holds no model: the
        model is built without weights once per process (`release` empties the block again)."""
        block = self._opened()[1].get_submodule(self.prefixes[k].removesuffix("."))
        tensors = self(k)
        with torch.no_grad():
            for name, p in block.named_parameters():
                p.data = tensors[name].to(p.dtype).contiguous()  # as `LazyBlocks` reads a block
        return block.eval()

    @staticmethod
    def release(block: nn.Module) -> None:
        """The weights `block` read dropped (placeholders of the same shapes: no memory)."""
        with torch.no_grad():
            for p in block.parameters():
                p.data = torch.empty(p.shape, dtype=p.dtype)

    def _opened(self) -> tuple[Any, nn.Module]:
        key = (str(self.path.resolve()), self.auto_class)
        if key not in _OPENED:
            model = _skeleton_of(self.path, self.auto_class)
            _OPENED[key] = (_files(self.path, model), model)
        return _OPENED[key]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": None}


_OPENED: dict[tuple[str, str], tuple[Any, nn.Module]] = {}  # per process: files opened, the model built for them


@contextmanager
def _one_name_map() -> Iterator[None]:
    """gguf's tensor-name map built once per (architecture, blocks) while this runs:
    transformers' `get_gguf_hf_weights_map` builds it again for every module of the model (397
    times, 6.4 s, for SmolLM2), each time the same."""
    import gguf

    built = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(built)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = built


def lazy_from_folder(path: Path, auto_class: str, capacity: int = DEFAULT_RESIDENT_BLOCKS) -> nn.Module:
    """A Hugging Face folder's model (`auto_class`, e.g. `AutoModelForCausalLM`) read block by block.

    Raises:
        ModelError: the folder has no safetensors weights, no chain of repeated blocks, or its
            files lack a tensor the model has.
    """
    model = _skeleton_of(path, auto_class)
    return _read_lazily(model, path, auto_class, _files(path, model), capacity)


def lazy_from_gguf(path: Path, capacity: int = DEFAULT_RESIDENT_BLOCKS) -> nn.Module:
    """A GGUF file's causal LM in float32, read block by block (see the module docstring).

    Raises:
        ModelError: no chain of repeated blocks, or the file lacks a tensor the model has.
    """
    model = _skeleton_of(path, "AutoModelForCausalLM")
    return _read_lazily(model, path, "AutoModelForCausalLM", _files(path, model), capacity)


def _skeleton_of(path: Path, auto_class: str) -> nn.Module:
    """The model of a folder or GGUF file built from its config, its weights unwritten."""
    import transformers

    if path.suffix.lower() == ".gguf":
        config = transformers.AutoConfig.from_pretrained(path.resolve().parent, gguf_file=path.name)
        return _skeleton(lambda: transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    config = transformers.AutoConfig.from_pretrained(path)
    return _skeleton(lambda: getattr(transformers, auto_class).from_config(config))


def _files(path: Path, model: nn.Module) -> Any:
    """The tensors of a GGUF file or of a folder's safetensors files, by the model's names."""
    return _GgufTensors(path, model) if path.suffix.lower() == ".gguf" else _SafetensorsFiles(path)


def read_by_block(path: Path, auto_class: str = "AutoModelForCausalLM") -> nn.Module | None:
    """A `.gguf` file's or a folder's model read block by block, or None where it cannot be
    (`.bin` weights only, no chain of blocks): the caller then loads it whole."""
    try:
        if path.suffix.lower() == ".gguf":
            return lazy_from_gguf(path)
        return lazy_from_folder(path, auto_class)
    except NotReadableByBlock:
        return None


def _skeleton(build: Callable[[], nn.Module]) -> nn.Module:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        return build()


def _read_lazily(model: nn.Module, path: Path, auto_class: str, files: Any, capacity: int) -> nn.Module:
    """Fill `model`'s stem and head from `files` (those of `path`) now and make its blocks read on use."""
    where = str(path)
    blocks = blocks_holding(model, lambda m: isinstance(m, nn.Linear))
    if not blocks:
        raise NotReadableByBlock(f"{where}: the model has no chain of repeated blocks to read one at a time")
    module_names = {id(m): n for n, m in model.named_modules()}
    prefixes = [module_names[id(b)] + "." for b in blocks]
    have = files.names()
    lazy = [p + n for p in prefixes for n, _ in dict(blocks[0].named_parameters()).items()]
    missing = [n for n in lazy if n not in have]
    stem_and_head = [(n, p) for n, p in model.named_parameters() if not n.startswith(tuple(prefixes))]
    missing += [n for n, _ in stem_and_head if n not in have and not _tied(model, n)]
    if missing:
        raise ModelError(
            f"{where} has no tensor {missing[0]!r} (of {len(missing)} missing); it cannot be read block by block"
        )
    with torch.no_grad():
        for name, p in stem_and_head:
            if name in have:
                t = files.get(name)
                if t.shape != p.shape:
                    raise ModelError(f"{where}: {name} is {tuple(t.shape)} in the file, {tuple(p.shape)} in the model")
                p.data = t.to(p.dtype).contiguous()
    model.tie_weights()
    model.config.use_cache = False
    names = [[n for n, _ in block.named_parameters()] for block in blocks]
    LazyBlocks(blocks, BlockFile(path, auto_class, prefixes, names, files), capacity)
    return model.eval()


def _tied(model: nn.Module, name: str) -> bool:
    """Whether parameter `name` is the output head tied to the input embedding (not in the file)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    names = {id(m): n for n, m in model.named_modules()}
    return tied and head is not None and embed is not None and name == names.get(id(head), "") + ".weight"
