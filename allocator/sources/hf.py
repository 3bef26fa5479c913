"""Local Hugging Face model folders: sentence-transformers, causal LM, masked LM, sequence
classifier or bare encoder, told apart by `config.json` (and `modules.json`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from profilers.tasks import EmbeddingTask, LogitsTask

from ..errors import ModelError
from .models import LoadedModel

__all__ = ["embedding_and_head", "load_hf_folder", "quiet_transformers", "skeleton_from_config"]


def quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_hf_folder(path: Path, *, name: str, lazy: bool = False) -> LoadedModel:
    """A local Hugging Face model folder in eval mode; with `lazy`, a causal LM's blocks are read
    from its safetensors files when used (`sources.lazy`)."""
    quiet_transformers()
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
        model = None
        if lazy and kind == "causal-lm":
            from .lazy import read_by_block

            model = read_by_block(path, auto)
        if model is None:
            model = getattr(transformers, auto).from_pretrained(path, **init)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the model weights in {path}: {e}") from None
    model.eval()
    rebuild = {"source": "transformers", "auto_class": auto, "init": init, "config": model.config.to_dict()}
    keep = embedding_and_head(model) if kind == "causal-lm" else ()
    return LoadedModel(name=name, model=model, task=task, tokenizer=tokenizer, kind=kind, rebuild=rebuild, keep=keep)


def embedding_and_head(model: nn.Module) -> tuple[str, ...]:
    """Module names of a transformers model's input embedding and output head (e.g.
    `model.embed_tokens`, `lm_head`): the layers a causal LM keeps in fp16 by default."""
    names = {id(m): n for n, m in model.named_modules()}
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            module = None
        name = names.get(id(module)) if module is not None else None
        if name and name not in found:
            found.append(name)
    return tuple(found)


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


def skeleton_from_config(info: dict[str, Any]) -> nn.Module:
    """A transformers model built from the config a packed file records, weights uninitialised."""
    quiet_transformers()
    import transformers

    config_dict = dict(info.get("config") or {})
    model_type = config_dict.pop("model_type", None)
    if not model_type:
        raise ModelError("its model config has no model_type")
    config = transformers.AutoConfig.for_model(model_type, **config_dict)
    auto = getattr(transformers, info.get("auto_class", "AutoModel"), None)
    if auto is None:
        raise ModelError(f"it names an unknown transformers class {info.get('auto_class')!r}")
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = auto.from_config(config, **info.get("init", {}))
    model.tie_weights()  # no_init_weights also skips tying: an lm_head tied to the embedding would stay apart
    return model.eval()
