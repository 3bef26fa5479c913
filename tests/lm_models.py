"""Small random-config causal LMs of the architectures users quantize most, built in the tests."""

import torch

__all__ = ["ARCHITECTURES", "LAYERS", "VOCAB", "tiny_lm"]

VOCAB = 300
# What sets each apart: mistral's sliding window, qwen2's q/k/v biases, qwen3's q/k norms, gemma2/3's
# post-norms, scaled embeddings, alternating sliding-window and global layers and soft-capped logits
# (gemma2), phi3's fused qkv_proj and gate_up_proj.
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 8}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 8,
                                                          "sliding_window_pattern": 2}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
}
LAYERS = {"phi3": 4}  # per block: qkv_proj, o_proj, gate_up_proj, down_proj


def tiny_lm(arch: str, layers: int = 2, vocab: int = VOCAB, seed: int = 0):
    import transformers

    config_cls, model_cls, extra = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, **extra,
    )  # fmt: skip
    return getattr(transformers, model_cls)(config).eval()
