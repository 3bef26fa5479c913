"""Small random-config causal LMs written as GGUF files, for the tests (`gguf.GGUFWriter`)."""

from pathlib import Path

import gguf
import numpy as np
import torch

__all__ = ["HEADS", "KV_HEADS", "POSITIONS", "write_tiny_gguf"]

HEADS, KV_HEADS, POSITIONS = 4, 2, 128
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "a n", "Ġ a"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as a printable character."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in bs]  # controls, space, ...: spelled from chr(256) up
    return {**{b: chr(b) for b in bs}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Query/key rows in llama.cpp's rotary order (transformers undoes this on load)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(
    path: Path, *, architecture: str = "llama", hidden: int = 64, intermediate: int = 128, seed: int = 0
) -> torch.nn.Module:
    """A random 2-layer Llama (lm_head tied to the embedding) written as an F32 GGUF with a
    byte-level BPE tokenizer of 263 tokens; returns the transformers model it holds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    alphabet = _bytes_to_unicode()
    tokens = [alphabet[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES] + ["<|endoftext|>"]
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=POSITIONS, rms_norm_eps=1e-5, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name("tiny-llama")
    w.add_block_count(2)
    w.add_context_length(POSITIONS)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(intermediate)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(hidden // HEADS)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])  # the last one is a control token
    w.add_token_merges(MERGES)
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}  # fmt: skip
    for i in range(2):
        layer = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[layer + "self_attn.q_proj.weight"], HEADS))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[layer + "self_attn.k_proj.weight"], KV_HEADS))
        for ours, theirs in names.items():
            w.add_tensor(f"blk.{i}.{ours}.weight", sd[f"{layer}{theirs}.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])  # no output.weight: the head is tied
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model




def write_arch_gguf(path: Path, arch: str, seed: int = 0) -> torch.nn.Module:
    """A random 2-block model of `arch` (`tests.lm_models.ARCHITECTURES`: qwen2, qwen3, gemma3, phi3, ...)
    written as an F32 GGUF the way llama.cpp's converter lays it out (gguf-py's tensor names; gemma's
    norms stored as 1 + w; llama's query/key rows permuted), with the byte-level BPE tokenizer of
    `write_tiny_gguf`; returns the transformers model it holds."""
    from tests.lm_models import tiny_lm

    alphabet = _bytes_to_unicode()
    tokens = [alphabet[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES] + ["<|endoftext|>"]
    model = tiny_lm(arch, vocab=len(tokens), seed=seed)
    config = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"] if "rope_theta" in config.rope_parameters
                         else config.rope_parameters["full_attention"]["rope_theta"])  # fmt: skip
    w.add_rope_dimension_count(head_dim)
    if getattr(config, "sliding_window", None):
        w.add_sliding_window(config.sliding_window)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges(MERGES)
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_pad_token_id(0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied to the embedding
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        assert name is not None, key
        data = value.numpy()
        if arch.startswith("gemma") and key.endswith("norm.weight"):
            data = data + 1  # llama.cpp's RMSNorm multiplies by the weight, Gemma's by 1 + weight
        w.add_tensor(name, data)  # the name keeps the key's .weight / .bias
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model
