"""GGUF plans of the built-in LLM (`smollm2`) against llama.cpp's own mixes, measured in llama.cpp.

Prints, from one run on this machine:
1. llama.cpp's mixes, made as a user makes them: `llama-quantize` from an F32 GGUF of the same
   weights, with an importance matrix from `llama-imatrix` on 32 x 512 tokens of the calibration
   text (`lee_background.cor`, as allocator's calibration), token embedding Q8_0 (as the source
   file stores it, and as the allocator plans copy it);
2. for each mix, the allocator GGUF plan (`solve --format gguf --budget <the mix's file size>B`,
   `apply -o plan.gguf`) at that file size or smaller;
3. plans at 3.0 / 3.5 / 4.0 decoder bits per weight (or why the format cannot reach one);
4. per file: bytes on disk, decoder bpw (the 210 decoder Linear tensors' bytes), perplexity and
   mean KL to the F32 model per token, measured by `llama-perplexity` on 16 x 512 tokens of
   Wikipedia text (`allocator.sources.text.wikipedia_documents`, never calibrated on), and prompt /
   generation tokens per second from `llama-bench` (2 threads, 128-token prompt, 32 tokens; an
   allocator file and the mix of its size take turns, three rounds, the median of each);
5. profile and apply times of the GGUF plans (and the native format's profile, with --native);
6. with `--layers`: on four of smollm2's layers, with their `H` from the calibration windows, the
   output error `tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)` (on the held-out windows' `H`) of each type as
   llama.cpp quantizes it with the same importance (`ggml_quantize_chunk` with `diag(H)` as
   its importance matrix) and as allocator rounds it (to nearest on its fitted grid, and GPTQ in
   activation order).

With `PYTHONPATH=<llama.cpp>/gguf-py` (llama.cpp's own gguf-py, which knows Q2_0) the profile
also offers Q2_0, the one 2-bit type that fits smollm2's 576-wide rows.

Prerequisite: llama.cpp, built by `benchmarks/llama_cpp.py` on first use (about 8 minutes).

Usage: .venv/bin/python benchmarks/bench_gguf.py [--out DIR] [--mixes Q4_0,Q4_K_M] [--bpw 3.0,3.5,4.0]
       [--profile PROFILE.json] [--no-speed] [--native] [--layers]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from cli_runs import allocator  # benchmarks/ (scripts run from their folder)
from llama_cpp import tool

MIXES = ("Q2_K", "Q3_K_S", "IQ3_XXS", "IQ3_M", "IQ4_XS", "Q4_0", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M")
EVAL_CHUNKS, CTX, IMATRIX_CHUNKS, THREADS = 16, 512, 32, "2"


def texts(out: Path) -> tuple[Path, Path]:
    """The calibration text (for llama-imatrix) and the evaluation text, as files."""
    from allocator.sources.text import lee_documents, wikipedia_documents

    calib, evaluation = out / "calibration.txt", out / "wikipedia.txt"
    if not calib.exists():
        calib.write_text("\n".join(lee_documents()) + "\n", encoding="utf-8")
    if not evaluation.exists():
        evaluation.write_text("\n\n".join(wikipedia_documents()) + "\n", encoding="utf-8")
    return calib, evaluation


def f32_source(out: Path) -> Path:
    """smollm2's GGUF with every tensor decoded to F32 (what llama-quantize quantizes from)."""
    import gguf
    import numpy as np

    from allocator.quantized.gguf_export import GgufSource
    from allocator.sources import load_model
    from allocator.sources.zoo import smollm2_path

    path = out / "smollm2.F32.gguf"
    if not path.exists():
        loaded = load_model("smollm2")
        source = GgufSource(smollm2_path(), loaded.model)
        decoded = {n: (gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32), gguf.GGMLQuantizationType.F32)
                   for n, t in source.tensors.items()}  # fmt: skip
        source.write(path, decoded, file_type="fp16")
    return path


def run(cmd: list[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return res.stdout + res.stderr


def llama_mix(f32: Path, imatrix: Path, mix: str, out: Path) -> Path:
    path = out / f"llama.{mix}.gguf"
    if not path.exists():
        run([str(tool("llama-quantize")), "--imatrix", str(imatrix), "--token-embedding-type", "q8_0", str(f32),
             str(path), mix, THREADS])  # fmt: skip
    return path


def quality(model: Path, text: Path, base: Path) -> tuple[float, float]:
    """(perplexity, mean KL per token to the F32 logits in `base`) of a GGUF file in llama.cpp."""
    log = run([str(tool("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", str(CTX), "--chunks",
               str(EVAL_CHUNKS), "-t", THREADS, "--kl-divergence-base", str(base), "--kl-divergence"])  # fmt: skip
    ppl = re.search(r"Mean PPL\(Q\)\s*:\s*([\d.]+)", log) or re.search(r"Final estimate: PPL = ([\d.]+)", log)
    kld = re.search(r"Mean\s+KLD:\s*([-\d.]+)", log)
    if ppl is None or kld is None:
        sys.exit(f"cannot read llama-perplexity's output for {model}:\n{log[-2000:]}")
    return float(ppl.group(1)), float(kld.group(1))


def speeds(models: list[Path], rounds: int = 3) -> list[tuple[float, float]]:
    """(prompt, generation) tokens per second of each file from llama-bench (2 threads, 3 runs each),
    the files taking turns for `rounds` rounds so that a slow moment of the machine falls on all of
    them: the median over the rounds."""
    import statistics

    seen: dict[Path, list[tuple[float, float]]] = {m: [] for m in models}
    for _ in range(rounds):
        for m in models:
            log = run([str(tool("llama-bench")), "-m", str(m), "-p", "128", "-n", "32", "-t", THREADS, "-r", "3",
                       "-o", "json"])  # fmt: skip
            rows = json.loads(log[log.index("[") : log.rindex("]") + 1])
            pp = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
            tg = next(r["avg_ts"] for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
            seen[m].append((float(pp), float(tg)))
    return [(statistics.median(p for p, _ in seen[m]), statistics.median(t for _, t in seen[m])) for m in models]


def decoder_bpw(model: Path) -> float:
    """Bits per weight of the decoder's Linear tensors (blk.*, 2-D) of a GGUF file."""
    import gguf

    tensors = [t for t in gguf.GGUFReader(model).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


LAYERS = ("model.layers.5.self_attn.q_proj", "model.layers.5.mlp.gate_proj", "model.layers.5.mlp.down_proj",
          "model.layers.20.self_attn.v_proj")  # fmt: skip


def layer_errors() -> None:
    """Step 6: single layers, llama.cpp's quantization against allocator's, under the layer's `H`."""
    import gguf
    import torch
    from llama_cpp import ggml_quantize

    from allocator.sources import load_data, load_model
    from profilers.input_hessians import input_hessians
    from profilers.layers import find_targets
    from profilers.quant.ggml.quantize import quantize_ggml
    from profilers.quant.ggml.types import fitting_types

    loaded = load_model("smollm2")
    data = load_data(loaded)
    targets = [t for t in find_targets(loaded.model) if t.spec.name in LAYERS]
    calib = input_hessians(loaded.model, data.calib, loaded.task, targets)
    held = input_hessians(loaded.model, data.evals, loaded.task, targets)

    def error(w: torch.Tensor, rec: torch.Tensor, h: torch.Tensor) -> float:
        d, h, w = (rec - w).double(), h.double(), w.double()
        return float(torch.einsum("ij,jk,ik->", d, h, d) / torch.einsum("ij,jk,ik->", w, h, w))

    print("\n| layer | type | llama.cpp (imatrix) | allocator, to nearest | allocator, GPTQ act-order |")
    print("|---|---|---|---|---|")
    for i, t in enumerate(targets):
        w, h = t.weight.detach().float(), calib[i]
        types = [ty for ty in fitting_types(w.shape[1]) if ty.available and ty.name not in ("q8_0", "q4_1", "q5_1")]
        nearest = quantize_ggml(w, types, method="rtn", hessian=h)
        gptq = quantize_ggml(w, types, method="gptq-act", hessian=h)
        for k, ty in enumerate(types):
            qtype = gguf.GGMLQuantizationType[ty.gguf]
            row_bytes = w.shape[1] // ty.block * ty.block_bytes
            raw = ggml_quantize(w.numpy(), int(qtype), row_bytes, torch.diag(h).numpy())
            theirs = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
            ours = [error(w, q[k].dequantize(), held[i]) for q in (nearest, gptq)]
            print(f"| {t.spec.name.removeprefix('model.')} | {ty.gguf} | {error(w, theirs, held[i]):.5f} |"
                  f" {ours[0]:.5f} | {ours[1]:.5f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "out" / "bench_gguf")
    parser.add_argument("--mixes", default=",".join(MIXES))
    parser.add_argument("--bpw", default="3.0,3.5,4.0")
    parser.add_argument("--profile", type=Path, help="reuse this GGUF profile of smollm2 instead of profiling")
    parser.add_argument("--no-speed", action="store_true", help="skip llama-bench")
    parser.add_argument("--native", action="store_true", help="also time the native format's profile")
    parser.add_argument("--layers", action="store_true", help="only the single-layer comparison (step 6)")
    args = parser.parse_args()
    if args.layers:
        layer_errors()
        return
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    calib, evaluation = texts(out)
    f32 = f32_source(out)
    imatrix = out / "imatrix.gguf"
    if not imatrix.exists():
        run([str(tool("llama-imatrix")), "-m", str(f32), "-f", str(calib), "-c", str(CTX), "--chunks",
             str(IMATRIX_CHUNKS), "-t", THREADS, "-o", str(imatrix)])  # fmt: skip
    base = out / "f32.kld"
    if not base.exists():
        run([str(tool("llama-perplexity")), "-m", str(f32), "-f", str(evaluation), "-c", str(CTX), "--chunks",
             str(EVAL_CHUNKS), "-t", THREADS, "--kl-divergence-base", str(base)])  # fmt: skip
    rows: list[dict] = []
    fp_ppl, _ = quality(f32, evaluation, base)
    print(f"F32: perplexity {fp_ppl:.3f} on {EVAL_CHUNKS} x {CTX} tokens of Wikipedia text (llama.cpp)", flush=True)

    profile = args.profile
    times = {}
    if profile is None:
        profile = out / "profile.json"
        _, times["profile (gguf)"] = allocator("profile", "smollm2", "--format", "gguf", "-o", str(profile))
    if args.native:
        _, times["profile (native)"] = allocator("profile", "smollm2", "-o", str(out / "profile.native.json"))

    def plan_file(budget: str, tag: str) -> Path | None:
        plan, gguf_file = out / f"plan.{tag}.json", out / f"allocator.{tag}.gguf"
        res = subprocess.run([sys.executable, "-m", "allocator.cli", "solve", "--profile", str(profile), "--budget",
                              budget, "-o", str(plan), "--no-progress"], capture_output=True, text=True)  # fmt: skip
        if res.returncode != 0:
            print(f"  {tag}: {res.stderr.strip().splitlines()[-1]}", flush=True)
            return None
        _, times[f"apply {tag}"] = allocator("apply", str(plan), "-o", str(gguf_file), "--no-check")
        return gguf_file

    def measure(kind: str, label: str, path: Path) -> dict:
        ppl, kld = quality(path, evaluation, base)
        row = {"kind": kind, "label": label, "bytes": path.stat().st_size, "bpw": decoder_bpw(path), "ppl": ppl,
               "kld": kld}  # fmt: skip
        print(f"  {kind:9s} {label:12s} {row['bytes'] / 1e6:8.2f} MB  {row['bpw']:.3f} bpw  ppl {ppl:.3f}"
              f" ({ppl / fp_ppl:.3f}x)  KL {kld:.4f}", flush=True)  # fmt: skip
        rows.append(row)
        return row

    def timed(*pairs: tuple[dict, Path]) -> None:
        """Speeds of files measured in turns (an allocator file and the mix of its size)."""
        if args.no_speed:
            return
        for (row, _), (pp, tg) in zip(pairs, speeds([p for _, p in pairs]), strict=True):
            row["pp"], row["tg"] = pp, tg
            print(f"  {row['kind']:9s} {row['label']:12s} prompt {pp:.0f} t/s, generation {tg:.1f} t/s", flush=True)
        if len(pairs) == 2:
            pairs[1][0]["pair_pp"], pairs[1][0]["pair_tg"] = pairs[0][0]["pp"], pairs[0][0]["tg"]

    for mix in [m for m in args.mixes.split(",") if m]:
        theirs = llama_mix(f32, imatrix, mix, out)
        mine = measure("llama.cpp", mix, theirs)
        ours = plan_file(f"{mine['bytes']}B", f"at-{mix}")
        if ours is None:
            timed((mine, theirs))
            continue
        timed((mine, theirs), (measure("allocator", f"at {mix}", ours), ours))
    for bpw in [b for b in args.bpw.split(",") if b]:
        ours = plan_file(f"{bpw}bpw", f"{bpw}bpw")
        if ours is not None:
            timed((measure("allocator", f"{bpw} bpw", ours), ours))
    (out / "results.json").write_text(json.dumps({"fp_ppl": fp_ppl, "rows": rows, "times": times}, indent=1))
    print_table(rows, fp_ppl, times)


def print_table(rows: list[dict], fp_ppl: float, times: dict[str, float]) -> None:
    """The results as a markdown table; an allocator file at a mix's size shows its speed as a ratio
    to the mix's, both measured in the same turns."""
    speed = bool(rows) and "pp" in rows[0]
    print("\n| file | MB | decoder bpw | ppl / FP | KL per token |" + (" pp t/s | tg t/s |" if speed else ""))
    print("|---|---|---|---|---|" + ("---|---|" if speed else ""))
    for r in rows:
        name = f"llama.cpp {r['label']}" if r["kind"] == "llama.cpp" else f"**allocator {r['label']}**"
        cells = f"| {name} | {r['bytes'] / 1e6:.2f} | {r['bpw']:.3f} | {r['ppl'] / fp_ppl:.3f} | {r['kld']:.4f} |"
        if speed and "pair_pp" in r:
            cells += f" {r['pp']:.0f} ({r['pp'] / r['pair_pp']:.2f}x) |"
            cells += f" {r['tg']:.1f} ({r['tg'] / r['pair_tg']:.2f}x) |"
        elif speed:
            cells += f" {r['pp']:.0f} | {r['tg']:.1f} |"
        print(cells)
    print("\ntimes: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - start:.0f}s")
