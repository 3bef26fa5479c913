"""GGUF files (llama.cpp's format) as causal LMs, through transformers.

transformers dequantizes every tensor to float on load, so the model that is profiled holds the
float values the file's quantized blocks decode to (for a Q4_1 file: 4-bit values times a scale
plus a minimum), not the checkpoint the file was made from.

The file is checked before transformers sees it, so bad input is one line naming the file:
- not GGUF: its first 4 bytes are not `GGUF`;
- truncated or corrupt: `gguf.GGUFReader` cannot read its header, metadata or tensor table (it
  memory-maps the file and reads no tensor data);
- an architecture transformers has no GGUF loader for (`general.architecture`);
- the `gguf` package missing (transformers needs it to read the file).

The packed file rebuilds the architecture from the config alone, as for a Hugging Face folder
(`hf.skeleton_from_config`); the GGUF file is not needed again.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from profilers.tasks import LogitsTask

from ..errors import ModelError
from .hf import embedding_and_head, quiet_transformers
from .models import LoadedModel

__all__ = ["GGUF_MAGIC", "check_gguf", "gguf_architectures", "gguf_reader", "load_gguf"]

GGUF_MAGIC = b"GGUF"

# llama.cpp's names for architectures that transformers loads under another name (as
# transformers' `load_gguf_checkpoint` renames them).
_RENAMED = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}


def gguf_architectures() -> tuple[str, ...]:
    """`general.architecture` values transformers can load from GGUF (empty when it does not say)."""
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:
        return ()
    return tuple(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def gguf_reader(path: Path) -> Any:
    """`gguf.GGUFReader(path)`, parsed once per file (its path, size and modification time) for
    the check and the block-by-block reading to share: a parse takes 4.4 s on SmolLM2's file (its
    49k-token vocabulary), and the file stays memory-mapped (address space, not memory)."""
    stat = path.stat()
    return _parsed(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _parsed(path: str, size: int, mtime: int) -> Any:
    from gguf import GGUFReader

    return GGUFReader(path, "r")


def check_gguf(path: Path) -> str:
    """The architecture (`general.architecture`) of a readable GGUF file transformers can load.

    Raises:
        ModelError: the file is missing, is not GGUF, is truncated or corrupt, holds an
            architecture transformers cannot load, or the `gguf` package is missing.
    """
    if not path.is_file():
        raise ModelError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror or e}") from None
    if magic != GGUF_MAGIC:
        found = "it is empty" if not magic else f"it starts with {magic!r}, not b'GGUF'"
        raise ModelError(
            f"{path} is not a GGUF file ({found}); give a .gguf file written by llama.cpp (convert_hf_to_gguf.py)"
            " or a Hugging Face model folder"
        )
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelError(f"reading {path} needs the gguf package: pip install gguf") from None
    try:
        field = gguf_reader(path).fields.get("general.architecture")
        arch = None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as e:
        raise ModelError(
            f"{path} is truncated or corrupt (the GGUF reader failed: {_first_line(e)}); copy or convert it again"
        ) from None
    if not isinstance(arch, str) or not arch:
        raise ModelError(f"{path} names no model architecture (general.architecture); convert it again with llama.cpp")
    supported = gguf_architectures()
    if supported and arch not in supported and _RENAMED.get(arch) not in supported:
        raise ModelError(
            f"{path} holds a {arch!r} model, which transformers cannot load from GGUF; it loads"
            f" {', '.join(supported)} (or give the model as a Hugging Face folder)"
        )
    return arch


def load_gguf(path: Path, *, name: str, lazy: bool = False) -> LoadedModel:
    """A GGUF file as a causal LM in float32 and eval mode, with its tokenizer, its embedding and
    output head kept in fp16 by default (`LoadedModel.keep`), and the config a packed file
    rebuilds it from. With `lazy`, its blocks are dequantized when used (`sources.lazy`).

    Raises:
        ModelError: in one line naming the file (see `check_gguf`), or transformers cannot build
            its tokenizer or model.
    """
    path = Path(path)
    arch = check_gguf(path)
    quiet_transformers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = path.resolve().parent, path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    except Exception as e:
        raise ModelError(f"cannot build the tokenizer of {path} ({arch}): {_first_line(e)}") from None
    try:
        model = None
        if lazy:
            from .lazy import read_by_block

            model = read_by_block(path)
        if model is None:
            with _no_dequantize_bar():
                model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(
            f"cannot load {path} ({arch}) as a causal LM: {_first_line(e)}; only causal LMs are read from GGUF"
        ) from None
    _forget_gguf_quantization(model)
    model.config.use_cache = False  # profiling and evaluation read whole windows; no KV cache
    model.eval()
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the packed file rebuilds a plain float model
    rebuild = {"source": "transformers", "auto_class": "AutoModelForCausalLM", "init": {}, "config": config}
    return LoadedModel(
        name=name,
        model=model,
        task=LogitsTask(causal=True),
        tokenizer=tokenizer,
        kind="causal-lm",
        rebuild=rebuild,
        keep=embedding_and_head(model),
        gguf=path,
    )


def _forget_gguf_quantization(model: nn.Module) -> None:
    """transformers marks a model loaded from GGUF as quantized (`hf_quantizer`,
    `config.quantization_config`), which refuses `.half()` and would make `save_pretrained` write
    a GGUF quantization config; its weights are plain float tensors, so drop the marks."""
    quantizer = getattr(model, "hf_quantizer", None)
    remove = getattr(quantizer, "remove_quantization_config", None)
    if remove is not None:
        remove(model)
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_is_quantized", False):
            config._is_quantized = False


@contextmanager
def _no_dequantize_bar() -> Iterator[None]:
    """transformers draws its "de-quantizing GGUF tensors" bar with plain tqdm, which its own
    progress-bar switch (`quiet_transformers`) does not reach: silence that one bar."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    saved = getattr(gguf_utils, "tqdm", None)
    if saved is None:
        yield
        return
    gguf_utils.tqdm = lambda items, *args, **kwargs: items
    try:
        yield
    finally:
        gguf_utils.tqdm = saved
