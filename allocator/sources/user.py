"""Models and data users bring that are not Hugging Face folders or text.

Models (`--model`):
- `package.module:function`: imported (the current folder first on the path) and called with
  no arguments; it returns the `nn.Module` to quantize.
- a file written by `torch.save(model)` (`.pt`, `.pth`, `.bin`): the whole module, unpickled.
  Unpickling runs code from the file, so only load files you trust; a state dict alone is
  refused (it has no architecture), with the fix.

Data (`--data`), split into disjoint calibration and evaluation samples:
- a tensor file: `.pt` / `.pth` (a tensor, an `(inputs, labels)` pair, or a dict with `inputs`
  and optionally `labels`), `.npy` (inputs), `.npz` / `.safetensors` (`inputs` and optionally
  `labels`, or a single array). Integer inputs of a model with a tokenizer are token ids.
- an image folder: one subfolder per class (the layout torchvision's `ImageFolder` reads),
  classes numbered in name order; every image the same size, scaled to [0, 1], grey when the
  model's first convolution takes one channel.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ModelError

__all__ = [
    "IMAGE_SUFFIXES",
    "MODULE_SUFFIXES",
    "TENSOR_SUFFIXES",
    "first_conv_channels",
    "image_folder",
    "import_model",
    "is_import_path",
    "load_saved_module",
    "tensor_file",
]

TENSOR_SUFFIXES = (".pt", ".pth", ".npy", ".npz", ".safetensors")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MODULE_SUFFIXES = (".pt", ".pth", ".bin")
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_import_path(text: str) -> bool:
    """`package.module:function`, and not a file that exists."""
    return bool(_IMPORT_PATH.match(text)) and not Path(text).exists()


def import_model(target: str) -> nn.Module:
    """Import `module:function` and call the function; it must return an `nn.Module`."""
    module_name, _, attr = target.partition(":")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelError(f"cannot import {module_name!r} for --model {target}: {e}") from e
    except Exception as e:  # the user's module raised while importing: say so, keep the traceback for --debug
        raise ModelError(f"importing {module_name!r} for --model {target} raised {type(e).__name__}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"{module_name} has no {attr!r} (for --model {target})")
        obj = getattr(obj, part)
    try:
        model = obj() if callable(obj) and not isinstance(obj, nn.Module) else obj
    except Exception as e:
        raise ModelError(f"--model {target}: {attr}() raised {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ModelError(f"{target} returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def load_saved_module(path: Path) -> nn.Module:
    """A whole module written by `torch.save(model, path)`."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ModelError(f"cannot load {path} with torch.load: {type(e).__name__}: {e}") from e
    if isinstance(obj, dict):
        raise ModelError(
            f"{path} holds a state dict (weights without the architecture); give --model module:function"
            " that builds the model and loads it, or save the whole module with torch.save(model, path)"
        )
    if not isinstance(obj, nn.Module):
        raise ModelError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module")
    return obj.eval()


def tensor_file(path: Path) -> tuple[Tensor, Tensor | None]:
    """`(inputs, labels or None)` from a tensor file, one sample per row of `inputs`."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise ModelError(f"data file {path} does not exist")
    if path.stat().st_size == 0:
        raise ModelError(f"data file {path} is empty (0 bytes)")
    try:
        if suffix in (".pt", ".pth"):
            obj: Any = torch.load(path, map_location="cpu", weights_only=True)
        elif suffix == ".npy":
            obj = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                obj = {k: torch.from_numpy(z[k]) for k in z.files}
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            raise ModelError(f"{path}: tensor files are {', '.join(TENSOR_SUFFIXES)}")
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"cannot read tensor file {path}: {e}") from None
    if isinstance(obj, dict) and len(obj) == 1 and "labels" not in obj:
        obj = next(iter(obj.values()))
    if isinstance(obj, dict):
        if "inputs" not in obj:
            raise ModelError(f"{path} holds {sorted(obj)}; name the model inputs 'inputs' (and targets 'labels')")
        inputs, labels = obj["inputs"], obj.get("labels")
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        inputs, labels = obj
    else:
        inputs, labels = obj, None
    if not isinstance(inputs, Tensor) or inputs.dim() == 0:
        raise ModelError(f"{path}: the inputs must be a tensor with one sample per row")
    if inputs.shape[0] < 2:
        raise ModelError(f"{path} holds {inputs.shape[0]} sample(s); calibration and evaluation need at least 2")
    if labels is not None and (not isinstance(labels, Tensor) or labels.shape[:1] != inputs.shape[:1]):
        raise ModelError(f"{path}: labels must be a tensor with one entry per input row")
    if inputs.is_floating_point() and not torch.isfinite(inputs).all():
        raise ModelError(f"{path}: the inputs hold NaN or infinite values")
    return inputs, labels


def image_folder(path: Path, *, channels: int | None = None) -> tuple[Tensor, Tensor, list[str]]:
    """`(images [n, c, h, w] in [0, 1], labels [n], class names)` from a folder of class subfolders."""
    from PIL import Image

    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    if not classes:
        raise ModelError(f"{path} has no class subfolders (expected {path}/<class>/<image>.png)")
    mode = {1: "L", 3: "RGB"}.get(channels or 3, "RGB")
    images, labels = [], []
    for index, name in enumerate(classes):
        for f in sorted((path / name).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    pixels = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
            except Exception as e:
                raise ModelError(f"cannot read image {f}: {e}") from None
            images.append(torch.from_numpy(pixels.reshape(*pixels.shape[:2], -1)).permute(2, 0, 1))
            labels.append(index)
    if len(images) < 2:
        raise ModelError(f"{path} holds {len(images)} image(s); calibration and evaluation need at least 2")
    sizes = {tuple(im.shape) for im in images}
    if len(sizes) > 1:
        raise ModelError(f"images in {path} differ in size ({', '.join(map(str, sorted(sizes)[:3]))}); resize them")
    return torch.stack(images), torch.tensor(labels), classes


def first_conv_channels(model: nn.Module) -> int | None:
    """Input channels of the model's first convolution, if it has one."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None
