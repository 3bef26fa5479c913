"""Where models and data come from, without any download.

- `models`: `load_model` (built-in names, Hugging Face folders, import paths, torch.save
  files) and `skeleton` (the architecture a packed file records).
- `data`: `load_data`, the disjoint calibration and held-out batches a model reads.
- `hf`, `user`, `zoo`, `text`: Hugging Face folders; the user's modules, tensor files and
  image folders; the built-in models; text corpora.
"""

from profilers.lazy import lazy_exports

# Torch-free names and defaults (the CLI prints them without importing torch).
DEFAULT_MODEL = "minilm"
BUILTIN_MODELS: tuple[str, ...] = ("minilm", "lenet-mnist")
DEFAULT_CALIBRATION = 64  # documents, images or samples
DEFAULT_MAX_LENGTH = 128  # tokens per document
DEFAULT_BATCH_SIZE = 16
DEFAULT_SEED = 0

_EXPORTS = {
    **dict.fromkeys(["LoadedModel", "load_model", "skeleton"], ".models"),
    **dict.fromkeys(["Data", "load_data"], ".data"),
    **dict.fromkeys(["lee_documents", "load_documents", "split_documents", "text_batches", "wordsim353"], ".text"),
    **dict.fromkeys(["image_folder", "import_model", "load_saved_module", "tensor_file"], ".user"),
    **dict.fromkeys(["lenet_mnist", "minilm_path", "mnist_5k"], ".zoo"),
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
