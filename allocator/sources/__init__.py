"""Where models and data come from, without any download.

- `models`: `load_model` (built-in names, Hugging Face folders, GGUF files, import paths,
  torch.save files) and `skeleton` (the architecture a packed file records).
- `data`: `load_data`, the disjoint calibration and held-out batches a model reads.
- `hf`, `gguf`, `user`, `zoo`, `text`: Hugging Face folders; GGUF files; the user's modules,
  tensor files and image folders; the built-in models; text corpora and token windows.
"""

from profilers.lazy import lazy_exports

# Torch-free names and defaults (the CLI prints them without importing torch).
DEFAULT_MODEL = "minilm"
BUILTIN_MODELS: tuple[str, ...] = ("minilm", "lenet-mnist", "smollm2", "gemma3")
DEFAULT_CALIBRATION = 64  # documents, images or samples
# The built-in MNIST images: GPTQ on LeNet's 800-wide inputs needs more than 64 of them (on 64,
# its 2.5 bpw plan measured 8.6x the held-out KL it has on 512, and 3.4x its predicted KL on
# the calibration images themselves; 1.3x on 512).
MNIST_CALIBRATION = 512
DEFAULT_MAX_LENGTH = 128  # tokens per document
DEFAULT_BATCH_SIZE = 16
DEFAULT_SEED = 0
# Causal LMs read text as non-overlapping token windows (`text.token_windows`), with these
# defaults where --calibration / --max-length / --batch-size are not given. A batch of logits is
# window x vocabulary floats per window: 512 x 49152 x 4 B = 100 MB for SmolLM2.
LLM_WINDOW = 512  # tokens per window (at most the model's max_position_embeddings)
# Calibration windows (fewer on a short text: `data.default_calibration_windows`). GPTQ's `H` reads
# them all, the sensitivity scores `LLM_SCORED` of them. On SmolLM2-135M at 3.5 bpw, against 8
# windows for both: held-out perplexity -4.0%, profile 241 s instead of 221 s; scoring all 32
# as well: -0.4% more, for 843 s.
LLM_CALIBRATION = 32
LLM_SCORED = 8
LLM_EVALUATION = 16  # held-out windows at most (8k tokens: about a minute per variant on 2 cores)
LLM_BATCH_SIZE = 2  # windows (or token-id rows) per batch
# Built-in texts `--data` names: the news corpus (every text model's default), and the mix of
# news, code, documentation and dialogue for causal LMs (`mix`; measured worse than the news
# alone on SmolLM2, on held-out news and on Wikipedia alike: not the default).
BUILTIN_TEXTS = ("news", "mix")

_EXPORTS = {
    **dict.fromkeys(["LoadedModel", "load_model", "load_tokenizer", "skeleton"], ".models"),
    **dict.fromkeys(["Data", "load_data"], ".data"),
    **dict.fromkeys(
        [
            "lee_documents",
            "load_documents",
            "split_documents",
            "split_windows",
            "text_batches",
            "token_windows",
            "window_batches",
            "wikipedia_documents",
            "wordsim353",
        ],
        ".text",
    ),
    **dict.fromkeys(["mix_documents", "mix_shares"], ".mix"),
    **dict.fromkeys(["check_gguf", "load_gguf"], ".gguf"),
    **dict.fromkeys(["image_folder", "import_model", "load_saved_module", "tensor_file"], ".user"),
    **dict.fromkeys(["gemma3_path", "lenet_mnist", "minilm_path", "mnist_5k", "smollm2_path"], ".zoo"),
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
