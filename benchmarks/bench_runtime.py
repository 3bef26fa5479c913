"""Packed SmolLM2 plans running in PyTorch: speed, memory and quality of `load_quantized`'s int4
kernels against the FP model and the dequantizing path.

Prints, from one run on this machine (2 threads, each model in a fresh process):
1. per model (FP float32, FP bfloat16, and each plan at 3.0 / 3.5 / 4.25 bpw loaded with the
   int4 kernels in bfloat16, and dequantizing in float32 on every call; the kernel's own float32
   path is a slow scalar loop, about 100x slower at 512 tokens, and is left out):
   - generation: tokens per second of greedy decoding with a KV cache (`generate`, 32 new
     tokens after a 128-token prompt: the time of 33 new tokens less the time of 1);
   - prompt processing: tokens per second of one 512-token forward pass;
   - resident memory after loading (RSS of the fresh process, model loaded, nothing run, less
     what it held after its imports) and the weight bytes the model holds;
   - perplexity on 8 x 512 tokens of Wikipedia text (`allocator.sources.text.wikipedia_documents`,
     never calibrated on) and, for the kernels, its ratio to the float32 dequantizing path's;
   each speed the best of 5 runs in each of 2 rounds over all the models in turn (1 run, 1 round
   for the dequantizing path: this machine's neighbours move medians by 20% and more between
   processes), and as a ratio to FP float32 measured in the same run;
2. all-MiniLM-L6-v2's 12MB plan (the demo's: `allocator solve --budget 12MB`, then `apply`), FP
   float32 against the int4 kernels in bfloat16 and the dequantizing path: seconds per
   16-document batch (128 tokens; the median over the 236 held-out documents' batches, each
   the best of 5 runs, in 2 rounds), resident memory, and the embeddings' mean cosine to FP on those documents;
3. with `--gguf FILE ...`: llama.cpp (`llama-bench`, 2 threads, 128-token prompt, 32 tokens) on
   GGUF files of plans at similar sizes (benchmarks/bench_gguf.py writes them), for how far the
   PyTorch runtime is from the native one.

The plans: `allocator solve --profile P --budget B` then `allocator apply` (CLI defaults) from a
profile of smollm2 (`--profile`, else `allocator profile smollm2` first, about 8 minutes).

Usage: .venv/bin/python benchmarks/bench_runtime.py [--out DIR] [--profile PROFILE.json]
       [--budgets 3.0,3.5,4.25] [--no-dequantized] [--no-minilm] [--gguf FILE ...]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cli_runs import allocator  # benchmarks/ (scripts run from their folder)

PROMPT, NEW_TOKENS, LONG_PROMPT, PPL_WINDOWS, CTX, RUNS, ROUNDS = 128, 32, 512, 8, 512, 5, 2


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (each tensor once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def best_seconds(fn, runs: int) -> float:
    """Seconds of the least disturbed of `runs` calls: this machine's neighbours move medians by 20%."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def worker(kind: str, path: str | None) -> dict:
    """Load one model in this (fresh) process and measure it."""
    import torch

    torch.set_num_threads(2)
    import transformers.models.llama.modeling_llama  # noqa: F401 - imports are not the model's memory

    from allocator.quantized.kernels import kernel_report
    from allocator.quantized.load import load_quantized
    from allocator.sources import load_model

    before = rss_bytes()
    if kind.startswith("fp"):
        model = load_model("smollm2").model
        if kind == "fp-bf16":
            model = model.to(torch.bfloat16)
    else:
        dtype = {"kernel-bf16": torch.bfloat16, "kernel-fp32": torch.float32}.get(kind, torch.float32)
        model = load_quantized(path, kernels=kind != "dequantized", compute_dtype=dtype)
        where = kernel_report(model)
    loaded_rss = rss_bytes() - before
    model.eval()
    model.generation_config.pad_token_id = model.generation_config.eos_token_id
    ids = torch.load(Path(__file__).resolve().parent.parent / "out" / "bench_runtime" / "tokens.pt")
    prompt, long_prompt = ids[:PROMPT].unsqueeze(0), ids[:LONG_PROMPT].unsqueeze(0)

    runs = RUNS if kind != "dequantized" else 1  # the slow path: one run
    timed = functools.partial(best_seconds, runs=runs)
    kw = {"do_sample": False, "use_cache": True}
    with torch.no_grad():
        model(prompt[:, :8])  # warm-up
        one = timed(lambda: model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw))
        full = timed(lambda: model.generate(prompt, max_new_tokens=NEW_TOKENS + 1, min_new_tokens=NEW_TOKENS + 1, **kw))
        pp = timed(lambda: model(long_prompt, use_cache=False))
        nll, n = 0.0, 0
        for w in range(PPL_WINDOWS):
            window = ids[LONG_PROMPT + w * CTX : LONG_PROMPT + (w + 1) * CTX].unsqueeze(0)
            logits = model(window, use_cache=False).logits.float()
            nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum"))
            n += CTX - 1
    out = {"kind": kind, "path": path, "tg": NEW_TOKENS / max(full - one, 1e-9), "pp": LONG_PROMPT / pp,
           "rss": loaded_rss, "weights": weight_bytes(model), "ppl": float(torch.tensor(nll / n).exp())}  # fmt: skip
    if not kind.startswith("fp"):
        out["on_kernel"] = sum(w.startswith("int4") for w in where.values())
        out["packed_layers"] = len(where)
    return out


def minilm_worker(kind: str, path: str | None) -> dict:
    """Load MiniLM (FP or packed) in this fresh process, time its held-out batches and save their
    embeddings for the parent's cosine."""
    import torch

    torch.set_num_threads(2)
    import transformers.models.bert.modeling_bert  # noqa: F401 - imports are not the model's memory

    from allocator.measure.metrics import model_outputs
    from allocator.quantized.kernels import kernel_report
    from allocator.quantized.load import load_quantized
    from allocator.sources import lee_documents, load_model, split_documents, text_batches

    before = rss_bytes()
    if kind == "minilm-fp32":
        model = load_model("minilm").model
    else:
        model = load_quantized(path, kernels=kind != "minilm-dequantized")
        where = kernel_report(model)
    loaded_rss = rss_bytes() - before
    loaded = load_model("minilm")  # the task and tokenizer (after the memory reading)
    _, eval_docs = split_documents(lee_documents(), 64, seed=0)  # the demo's held-out documents
    batches = text_batches(loaded.tokenizer, eval_docs)
    with torch.no_grad():
        batch_times = [best_seconds(lambda b=b: loaded.task.forward(model, b), RUNS) for b in batches]
    outs = [o.float() for o in model_outputs(model, batches, loaded.task)]
    torch.save(outs, Path(__file__).resolve().parent.parent / "out" / "bench_runtime" / f"{kind}.outputs.pt")
    row = {"kind": kind, "path": path, "batch_s": statistics.median(batch_times), "rss": loaded_rss,
           "weights": weight_bytes(model)}  # fmt: skip
    if kind == "minilm-kernel-bf16":
        row["on_kernel"], row["packed_layers"] = sum(w.startswith("int4") for w in where.values()), len(where)
    return row


def minilm(out: Path, no_dequantized: bool) -> None:
    """The demo's 12MB plan of MiniLM: FP against the packed file on the kernels (see the docstring)."""
    import torch

    plan, packed = out / "plan.minilm.12MB.json", out / "minilm.12MB.safetensors"
    if not packed.exists():
        allocator("solve", "--budget", "12MB", "-o", str(plan))
        allocator("apply", str(plan), "-o", str(packed), "--no-check")
    kinds = ("minilm-fp32", "minilm-kernel-bf16", *(() if no_dequantized else ("minilm-dequantized",)))
    rows = in_rounds([(kind, packed if kind != "minilm-fp32" else None) for kind in kinds])
    outs = {r["kind"]: torch.load(out / f"{r['kind']}.outputs.pt") for r in rows}
    ref = outs["minilm-fp32"]
    print(f"\n| all-MiniLM-L6-v2 | path | s per 16-document batch (x FP32) | RSS after load | weights |"
          f" cosine to FP ({packed.stat().st_size / 1e6:.2f} MB file) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in rows:
        cos = torch.cat(
            [torch.nn.functional.cosine_similarity(a, b) for a, b in zip(ref, outs[r["kind"]], strict=True)]
        )
        path = {"minilm-fp32": "float32", "minilm-kernel-bf16": "int4 kernel, bf16",
                "minilm-dequantized": "dequantize on call"}[r["kind"]]  # fmt: skip
        kernel = f" ({r['on_kernel']}/{r['packed_layers']} layers)" if "on_kernel" in r else ""
        print(f"| {'FP' if r['kind'] == 'minilm-fp32' else '12MB plan'} | {path}{kernel} | {r['batch_s']:.3f}"
              f" ({rows[0]['batch_s'] / r['batch_s']:.2f}x) | {r['rss'] / 1e6:.0f} MB | {r['weights'] / 1e6:.0f} MB |"
              f" {float(cos.mean()):.5f} |")  # fmt: skip


def in_rounds(jobs: list[tuple[str, Path | None]]) -> list[dict]:
    """Every job's worker, in `ROUNDS` rounds of all the models in turn (the dequantizing path in the
    first only), each speed the best over the rounds: a neighbour that slows this machine for a
    minute slows one model's round, not its figure."""
    rows: dict[tuple[str, Path | None], dict] = {}
    for r in range(ROUNDS):
        for kind, path in jobs:
            if r and kind.endswith("dequantized"):
                continue
            row = measure(kind, path)
            if (kind, path) in rows:
                best = rows[(kind, path)]
                for key in ("tg", "pp"):
                    if key in row:
                        best[key] = max(best[key], row[key])
                if "batch_s" in row:
                    best["batch_s"] = min(best["batch_s"], row["batch_s"])
            else:
                rows[(kind, path)] = row
    return list(rows.values())


def measure(kind: str, path: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind] + ([str(path)] if path else [])
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        sys.exit(f"{kind} {path} failed:\n{res.stderr[-3000:]}")
    row = json.loads(res.stdout.strip().splitlines()[-1])
    if "batch_s" in row:
        print(f"  {kind:18s} {row['batch_s'] * 1e3:6.0f} ms per batch  RSS {row['rss'] / 1e6:6.0f} MB", flush=True)
        return row
    print(f"  {kind:12s} {'' if path is None else path.name:22s} generation {row['tg']:6.1f} t/s  prompt"
          f" {row['pp']:6.0f} t/s  RSS {row['rss'] / 1e6:6.0f} MB  weights {row['weights'] / 1e6:6.0f} MB"
          f"  ppl {row['ppl']:.3f}", flush=True)  # fmt: skip
    return row


def tokens(out: Path) -> None:
    """The evaluation tokens (Wikipedia text, smollm2's tokenizer), saved for the workers."""
    import torch

    from allocator.sources import load_model
    from allocator.sources.text import wikipedia_documents

    path = out / "tokens.pt"
    if path.exists():
        return
    tok = load_model("smollm2").tokenizer
    ids = tok("\n\n".join(wikipedia_documents()), return_tensors="pt")["input_ids"][0]
    need = LONG_PROMPT + PPL_WINDOWS * CTX
    if ids.numel() < need:
        sys.exit(f"the Wikipedia text has {ids.numel()} tokens; the benchmark needs {need}")
    torch.save(ids[:need].clone(), path)


def llama_bench(path: Path) -> tuple[float, float]:
    from llama_cpp import tool

    res = subprocess.run([str(tool("llama-bench")), "-m", str(path), "-p", str(PROMPT), "-n", str(NEW_TOKENS), "-t",
                          "2", "-r", "3", "-o", "json"], capture_output=True, text=True, check=True)  # fmt: skip
    rows = json.loads(res.stdout[res.stdout.index("[") : res.stdout.rindex("]") + 1])
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    return float(pp), float(tg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "out" / "bench_runtime")
    parser.add_argument("--profile", type=Path, help="a native profile of smollm2 (else profiled first)")
    parser.add_argument("--budgets", default="3.0,3.5,4.25")
    parser.add_argument("--no-dequantized", action="store_true", help="skip the dequantize-on-call path (slow)")
    parser.add_argument("--no-minilm", action="store_true", help="skip all-MiniLM-L6-v2's 12MB plan")
    parser.add_argument("--gguf", type=Path, nargs="*", default=[], help="GGUF files to time in llama.cpp too")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, path = args.worker[0], args.worker[1] if len(args.worker) > 1 else None
        print(json.dumps((minilm_worker if kind.startswith("minilm") else worker)(kind, path)))
        return
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tokens(out)
    profile = args.profile
    if profile is None:
        profile = out / "profile.json"
        allocator("profile", "smollm2", "-o", str(profile))
    files = {}
    for b in [b for b in args.budgets.split(",") if b]:
        plan, packed = out / f"plan.{b}bpw.json", out / f"smollm2.{b}bpw.safetensors"
        if not packed.exists():
            allocator("solve", "--profile", str(profile), "--budget", f"{b}bpw", "-o", str(plan))
            allocator("apply", str(plan), "-o", str(packed), "--no-check")
        files[b] = packed
    plans = [(kind, packed) for packed in files.values()
             for kind in ("kernel-bf16",) + (() if args.no_dequantized else ("dequantized",))]  # fmt: skip
    rows = in_rounds([("fp32", None), ("fp-bf16", None), *plans])
    bpw = {packed: b for b, packed in files.items()}
    for row in rows[2:]:
        row["bpw"] = bpw[Path(row["path"])]
    gguf = []
    for path in args.gguf:
        pp, tg = llama_bench(path)
        gguf.append({"path": str(path), "pp": pp, "tg": tg, "bytes": path.stat().st_size})
        print(f"  llama.cpp   {path.name:22s} generation {tg:6.1f} t/s  prompt {pp:6.0f} t/s ({PROMPT} tokens)")
    (out / "results.json").write_text(json.dumps({"rows": rows, "gguf": gguf}, indent=1))
    print_table(rows, gguf)
    if not args.no_minilm:
        minilm(out, args.no_dequantized)


def print_table(rows: list[dict], gguf: list[dict]) -> None:
    fp = rows[0]
    exact = {r["bpw"]: r for r in rows if r["kind"] == "dequantized"}
    print("\n| model | path | generation t/s (x FP32) | prompt 512 t/s (x FP32) | RSS after load | weights |"
          " perplexity | x float32 path |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = "FP" if r["kind"].startswith("fp") else f"{r['bpw']} bpw"
        path = {"fp32": "float32", "fp-bf16": "bfloat16", "kernel-bf16": "int4 kernel, bf16",
                "dequantized": "dequantize on call"}[r["kind"]]  # fmt: skip
        base = exact.get(r.get("bpw"))
        ratio = f"{r['ppl'] / base['ppl']:.4f}" if base is not None and base is not r else ""
        kernel = f" ({r['on_kernel']}/{r['packed_layers']} layers)" if r["kind"].startswith("kernel") else ""
        print(f"| {name} | {path}{kernel} | {r['tg']:.1f} ({r['tg'] / fp['tg']:.2f}x) | {r['pp']:.0f}"
              f" ({r['pp'] / fp['pp']:.2f}x) | {r['rss'] / 1e6:.0f} MB | {r['weights'] / 1e6:.0f} MB |"
              f" {r['ppl']:.3f} | {ratio} |")  # fmt: skip
    for g in gguf:
        name, size = Path(g["path"]).name, g["bytes"] / 1e6
        print(f"| {name} ({size:.1f} MB) | llama.cpp | {g['tg']:.1f} ({g['tg'] / fp['tg']:.2f}x)"
              f" | {g['pp']:.0f} at {PROMPT} tokens | | | | |")  # fmt: skip


if __name__ == "__main__":
    main()
