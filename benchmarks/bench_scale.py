"""How the profile and the apply scale past SmolLM2: wall time per block and per quantizable
weight, and peak resident memory, for models of other shapes against SmolLM2-135M's, each stage
a fresh `allocator` process measured on its own (`os.wait4`: that child's peak RSS).

Models (random weights, written once under `--cache` with a borrowed 30k-token tokenizer, so
the calibration text tokenizes to ids the large vocabularies hold):
- `smollm2`: SmolLM2-135M (the real model, the reference: 30 blocks, 576 wide, 49k vocabulary);
- `gemma3-270m`: Gemma-3 shaped (18 blocks, 640 wide, 2048 MLP, 262k tied vocabulary,
  sliding-window and global layers), 100M quantizable weights as SmolLM2's 106M;
- `llama-1b`: Llama-3.2-1B shaped (16 blocks, 2048 wide, 8192 MLP, 128k tied vocabulary).

Printed per model and stage: wall seconds, seconds per block, microseconds per quantizable
weight and its ratio to SmolLM2's, peak RSS, the float32 model's bytes, and the head's logits
per batch (whole, and the chunk a profile's head pass holds).

Usage: .venv/bin/python benchmarks/bench_scale.py [--models smollm2,gemma3-270m] [--calibration N]
    [--no-apply] [--grid "--bits 2,3,4 --terms 1 --fractions 0"] [--max-memory 3.4GB] [--cache out/bench_scale]
The defaults (all three models, 32 calibration windows, profile and apply) take about 1.5 hours
on 2 cores; `--models smollm2,gemma3-270m` about 25 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "gemma3-270m": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, sliding_window=512, max_position_embeddings=32_768)),
    "llama-1b": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=128_256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131_072)),
}  # fmt: skip
WINDOW, BATCH = 512, 2  # tokens per calibration window, windows per batch (allocator's causal-LM defaults)


def write_model(name: str, folder: Path, shape: tuple[str, str, dict] | None = None) -> Path:
    """The random-config model `name` (or of `shape`: config class, model class, config values)
    saved as a Hugging Face folder (once), with MiniLM's tokenizer."""
    import torch
    import transformers

    from allocator.sources.zoo import minilm_path

    if (folder / "model.safetensors").is_file():
        return folder
    config_cls, model_cls, values = shape or SHAPES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**values, tie_word_embeddings=True)
    model = getattr(transformers, model_cls)(config)
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm_path() / f).is_file():
            (partial / f).write_bytes((minilm_path() / f).read_bytes())
    partial.rename(folder)
    return folder


def run_stage(args: list[str], log: Path) -> tuple[float, int]:
    """Run `allocator ARGS` in a fresh process: its wall seconds and peak RSS in bytes."""
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "allocator", *args], stdout=out, stderr=subprocess.STDOUT,
                                cwd=ROOT)  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"allocator {' '.join(args)} failed; see {log}")
    return seconds, usage.ru_maxrss * 1024


def describe(profile: Path) -> dict[str, float]:
    doc = json.loads(profile.read_text())
    weights = sum(layer["spec"]["rows"] * layer["spec"]["cols"] for layer in doc["layers"])
    return {"blocks": doc["settings"].get("blocks", 0), "layers": len(doc["layers"]), "weights": weights}


def head_bytes(model: str, folder: Path | None) -> tuple[int, int]:
    """Float32 logits of one batch, whole, and as the profile's head pass holds them (one sample's
    chunk of positions where the whole exceeds `HEAD_CHUNK_BYTES`)."""
    from profilers.estimators.segments import HEAD_CHUNK_BYTES

    vocab = 49_152 if folder is None else json.loads((folder / "config.json").read_text())["vocab_size"]
    whole = BATCH * WINDOW * vocab * 4
    rows = max(64, HEAD_CHUNK_BYTES // (4 * vocab) // 64 * 64)
    return whole, whole if whole <= HEAD_CHUNK_BYTES else rows * vocab * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,gemma3-270m,llama-1b")
    parser.add_argument("--calibration", type=int, default=32, help="calibration windows of 512 tokens")
    parser.add_argument("--no-apply", action="store_true", help="profile only")
    parser.add_argument("--budget", default="3.5bpw")
    parser.add_argument("--grid", default="", help="options of `allocator profile` narrowing the choice grid, the"
                        " same for every model (e.g. \"--bits 2,3,4 --terms 1 --fractions 0\"); default: allocator's")
    parser.add_argument("--max-memory", default="", help="the profile's --max-memory (e.g. 3.4GB)")
    parser.add_argument("--cache", type=Path, default=ROOT / "out" / "bench_scale")
    opts = parser.parse_args()
    opts.cache.mkdir(parents=True, exist_ok=True)
    names = opts.models.split(",")
    unknown = [n for n in names if n != "smollm2" and n not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown model {unknown[0]!r}; choose from smollm2, {', '.join(SHAPES)}")
    rows = []
    for name in names:
        folder = None if name == "smollm2" else write_model(name, opts.cache / name)
        model = "smollm2" if folder is None else str(folder)
        profile, plan, packed = (opts.cache / f"{name}.{ext}" for ext in ("profile.json", "plan.json", "safetensors"))
        stages = [("profile", ["profile", model, "-o", str(profile), "--calibration", str(opts.calibration),
                               *opts.grid.split(), *(["--max-memory", opts.max_memory] if opts.max_memory else []),
                               "--no-progress"])]  # fmt: skip
        if not opts.no_apply:
            stages.append(("apply", ["apply", "--model", model, str(plan), "-o", str(packed), "--no-check",
                                     "--no-progress"]))  # fmt: skip
        for stage, args in stages:
            if stage == "apply":
                solve = ["solve", "-p", str(profile), "--budget", opts.budget, "-o", str(plan), "--no-progress"]
                subprocess.run([sys.executable, "-m", "allocator", *solve], check=True, cwd=ROOT, capture_output=True)
            print(f"[{name}] {stage} ...", flush=True)
            seconds, rss = run_stage(args, opts.cache / f"{name}.{stage}.log")
            shape = describe(profile)
            rows.append((name, stage, seconds, rss, shape, head_bytes(name, folder)))
            print(f"[{name}] {stage}: {seconds:.0f} s, peak RSS {rss / 1e9:.2f} GB", flush=True)
    report(rows)


def report(rows: list[tuple]) -> None:
    reference = {stage: seconds / shape["weights"] for name, stage, seconds, _, shape, _ in rows if name == "smollm2"}
    print("\n| model | stage | blocks | quantizable weights | wall s | s per block | us per weight (x SmolLM2) |"
          " peak RSS GB | 3 GB + 2 blocks | head logits per batch (held) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, stage, seconds, rss, shape, (whole, held) in rows:
        per = seconds / shape["weights"]
        ratio = f" ({per / reference[stage]:.2f}x)" if stage in reference else ""
        per_block = seconds / shape["blocks"] if shape["blocks"] else float("nan")
        bar = 3e9 + 2 * 4 * shape["weights"] / max(1, shape["blocks"])  # float32 blocks (their quantizable weights)
        print(f"| {name} | {stage} | {shape['blocks']} | {shape['weights'] / 1e6:.1f}M | {seconds:.0f} | "
              f"{per_block:.1f} | {per * 1e6:.2f}{ratio} | {rss / 1e9:.2f} | {bar / 1e9:.2f} | {whole / 1e9:.2f} GB "
              f"({held / 1e9:.2f} GB) |")  # fmt: skip


if __name__ == "__main__":
    main()
