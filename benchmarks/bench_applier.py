"""Applier benchmark on all-MiniLM-L6-v2: rounding methods, terms, the packed file, memory.

Prints, from one run (embedding cosine to FP on the 236 held-out documents):
1. uniform settings on the 36 encoder Linear layers (embeddings FP, as design.md measures):
   RTN, GPTQ and HQQ (if installed: `pip install 'allocator[bench]'`) at 3 and 4 bits, group 64;
2. terms against single terms at group 64: two 2-bit terms (residual, joint, tied) against one
   4-bit term; two 4-bit terms (residual, tied) against lossless (cosine >= 0.9995);
3. the demo budget (12MB, whole model): the plan profiled and applied with RTN, and with GPTQ;
4. the packed file of the 12MB GPTQ plan: size on disk against prediction and budget, reload
   against the fake-quantized model, and peak resident memory of a fresh process that loads and
   runs it, against one that loads and runs the FP model.

Usage: .venv/bin/python benchmarks/bench_applier.py
"""

from __future__ import annotations

import copy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import allocator
from allocator import sources
from allocator.measure.metrics import model_outputs
from allocator.quantized.apply import apply_choices_, layer_hessians
from allocator.quantized.export import export_quantized
from allocator.quantized.load import load_quantized
from profilers.quant.cost import weight_bytes
from profilers.types import Choice


def cosine(reference, model, batches, task) -> float:
    outs = model_outputs(model, batches, task)
    pairs = zip(reference, outs, strict=True)
    return float(torch.cat([torch.nn.functional.cosine_similarity(r, o) for r, o in pairs]).mean())


def hqq_model(model, layers, bits: int, group: int):
    from hqq.core.quantize import Quantizer

    q = copy.deepcopy(model)
    modules = dict(q.named_modules())
    with torch.no_grad():
        for name in layers:
            w = modules[name].weight
            w_q, meta = Quantizer.quantize(
                w.detach().float(), nbits=bits, group_size=group, optimize=True, axis=1, device="cpu",
                compute_dtype=torch.float32,
            )  # fmt: skip
            w.copy_(Quantizer.dequantize(w_q, meta).reshape(w.shape).half().float())
    return q


MEMORY_PROBE = """
import sys, torch
sys.path.insert(0, {root!r})
def status(key):  # this process's own numbers (ru_maxrss would include the parent's, across exec)
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
kind, path = sys.argv[1], sys.argv[2]
from transformers import AutoTokenizer, BertModel  # the model classes' imports are not the model
import allocator
from allocator import sources
tok = AutoTokenizer.from_pretrained(sources.minilm_path())
batch = sources.text_batches(tok, sources.lee_documents()[:16], max_length=128)[0]
base = status("VmRSS:")
model = sources.load_model("minilm").model if kind == "fp" else allocator.load_quantized(path)
tensors = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
with torch.no_grad():
    model(**batch)  # touches every weight: memory-mapped FP weights count only once read
after = status("VmRSS:")
print(tensors, after - base, status("VmHWM:") - base)
"""


def memory_mb(kind: str, path: str) -> tuple[float, float, float]:
    """A fresh process loads the model and runs one forward pass of 16 documents; returns the
    bytes of the model's tensors, its resident memory after the pass, and the peak during it,
    above what the process held before loading (MiB)."""
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE.format(root=root), kind, path], capture_output=True, text=True, check=True
    )
    tensors, after, peak = (float(x) for x in out.stdout.strip().splitlines()[-1].split())
    return tensors, after, peak


def main() -> None:
    loaded = sources.load_model("minilm")
    model, task = loaded.model, loaded.task
    calib_docs, eval_docs = sources.split_documents(sources.lee_documents(), 64, seed=0)
    calib = sources.text_batches(loaded.tokenizer, calib_docs)
    evals = sources.text_batches(loaded.tokenizer, eval_docs)
    reference = model_outputs(model, evals, task)
    hessians = layer_hessians(model, calib, task)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    print(f"all-MiniLM-L6-v2: {len(linears)} encoder Linear layers; cosine to FP on {len(eval_docs)} documents")

    def uniform(label: str, method: str) -> float:
        q = apply_choices_(
            copy.deepcopy(model), dict.fromkeys(linears, Choice.parse(label)), method=method, hessians=hessians,
            round_rest_to_fp16=False,
        )  # fmt: skip
        return cosine(reference, q, evals, task)

    print("\n1. uniform, 36 encoder Linear layers, group 64")
    try:
        import hqq  # noqa: F401

        have_hqq = True
    except ImportError:
        have_hqq = False
    for bits in (3, 4):
        label = f"int{bits}-g64"
        rtn, gptq = uniform(label, "rtn"), uniform(label, "gptq")
        line = f"   {label} ({bits + 0.5} bpw): RTN {rtn:.4f}  GPTQ {gptq:.4f}"
        if have_hqq:
            h = cosine(reference, hqq_model(model, linears, bits, 64), evals, task)
            verdict = "≥" if max(rtn, gptq) >= h else "<"
            line += f"  HQQ {h:.4f}   better of RTN/GPTQ {verdict} HQQ"
        else:
            line += "  HQQ: not installed (pip install 'allocator[bench]'), skipped"
        print(line)

    print("\n2. terms against single terms, group 64 (RTN | GPTQ)")
    for label in ("int4-g64", "int2x2-g64", "int2x2j-g64", "int2x2t-g64", "int8-g64", "int4x2-g64", "int4x2t-g64"):
        bpw = 8 * weight_bytes(384, 384, Choice.parse(label)) / 384 / 384
        print(f"   {label:12s} {bpw:5.2f} bpw   {uniform(label, 'rtn'):.5f} | {uniform(label, 'gptq'):.5f}")

    print("\n3. 12MB (whole model): the plan under each rounding")
    plans = {}
    for method in ("rtn", "gptq"):
        start = time.perf_counter()
        table = allocator.profile(model, calib, task=task, method=method)
        seconds = time.perf_counter() - start
        plan = allocator.solve(table, budget="12MB")
        plans[method] = plan
        q = allocator.apply_plan_(copy.deepcopy(model), plan, hessians=hessians)
        print(
            f"   {method:4s} profile {seconds:5.1f}s  predicted 1-cos {plan.predicted.loss:.5f}"
            f"  cosine {cosine(reference, q, evals, task):.4f}"
        )

    print("\n4. the packed file of the 12MB GPTQ plan")
    plan = plans["gptq"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "minilm-12MB.safetensors"
        start = time.perf_counter()
        export_quantized(model, plan, path, rebuild=loaded.rebuild, hessians=hessians)
        export_s = time.perf_counter() - start
        size = path.stat().st_size
        change = 100 * (size / plan.predicted.bytes - 1)
        print(
            f"   {size:,} bytes on disk; plan predicted {plan.predicted.bytes:,} ({change:+.2f}%);"
            f" budget 12,000,000 ({'within' if size <= 12_000_000 else 'OVER'}); export {export_s:.1f}s"
        )
        start = time.perf_counter()
        reloaded = load_quantized(path, kernels=False)  # the exact float32 weights (the kernels' bf16: bench_runtime)
        load_s = time.perf_counter() - start
        fake = allocator.apply_plan_(copy.deepcopy(model), plan, hessians=hessians)
        diff = max(
            float((a - b).abs().max())
            for a, b in zip(model_outputs(fake, evals[:2], task), model_outputs(reloaded, evals[:2], task), strict=True)
        )
        print(f"   reload {load_s:.1f}s; outputs vs fake-quantized model: max |difference| {diff:.2e}")
        fp, packed = memory_mb("fp", ""), memory_mb("packed", str(path))
        print("   a fresh process loads the model and runs 16 documents (MiB above its imports):")
        for label, (tensors, after, peak) in (("FP (fp32, as loaded)", fp), ("packed", packed)):
            print(f"     {label:22s} model tensors {tensors:6.1f}  resident after {after:6.1f}  peak {peak:6.1f}")
        print(f"   packed / FP: tensors {packed[0] / fp[0]:.2f}x, resident {packed[1] / fp[1]:.2f}x")


if __name__ == "__main__":
    main()
