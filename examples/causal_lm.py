"""A causal language model from Python: plan, measure perplexity, compare with HQQ, export.

The model is a small Llama built from a random config and saved with `transformers` (so it runs
anywhere, with nothing to download); it borrows all-MiniLM-L6-v2's tokenizer to read the news
corpus. Its perplexity is near the vocabulary size, as a random model's is: what the example
shows is how little the plan moves it and the KL divergence, against uniform settings and HQQ.

Run: .venv/bin/python examples/causal_lm.py   (needs `pip install -e '.[examples,compare]'`)
"""

import shutil
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import allocator
from allocator import sources
from allocator.measure.evaluate import compare
from allocator.measure.peers import peer_variants


def random_llama(folder: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=30522, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(sources.minilm_path() / name, folder / name)
    return folder


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        loaded = sources.load_model(str(random_llama(Path(tmp) / "llama")))  # detected as a causal LM
        # a causal LM reads the news corpus as 64-token windows: 32 to calibrate, 32 held out
        data = sources.load_data(loaded, calibration=32, max_length=64, batch_size=8)

        plan = allocator.solve(loaded.model, data.calib, budget="4.5bpw", task=loaded.task)
        print(f"plan: {plan.predicted.bpw:.3f} bpw, predicted KL {plan.predicted.loss:.4f} nats per window")
        for label, (layers, weights, _) in plan.choice_summary().items():
            print(f"  {label:14s} {layers:2d} layers {weights:>10,d} weights")

        hessians = allocator.layer_hessians(loaded.model, data.calib, loaded.task)
        peers, skipped = peer_variants(["hqq"], loaded.model, plan, data.calib, loaded.task)
        result = compare(loaded.model, plan, data.evals, loaded.task, hessians=hessians, peers=peers, skipped=skipped)
        for m in result.rows:
            print(f"  {m.label:26s} {m.bytes / 1e6:6.2f} MB  perplexity {m.perplexity:9.2f}  KL {m.divergence:.4f}")
        for reason in result.skipped:
            print(f"  skipped {reason}")

        path = allocator.export_quantized(
            loaded.model, plan, Path(tmp) / "llama.safetensors", hessians=hessians, rebuild=loaded.rebuild
        )
        packed = allocator.load_quantized(path)
        batch = data.evals[0]
        with torch.no_grad():
            same = (packed(**batch).logits.argmax(-1) == loaded.model(**batch).logits.argmax(-1)).float().mean()
        print(f"packed file {path.stat().st_size:,} bytes; reloaded top-1 agreement with FP {float(same):.3f}")


if __name__ == "__main__":
    main()
