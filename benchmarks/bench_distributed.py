"""The block-streamed profile on a local Ray cluster against one process: wall time, the
driver's peak memory, what each block task moves and costs, and whether the scores are equal.

Each profile is a fresh `allocator profile` process (`os.wait4`: the driver's own peak RSS; Ray's
workers and object store are other processes, their memory not counted there). Models:
- `smollm2`: SmolLM2-135M (30 blocks), read block by block from its GGUF file;
- `llama-1b-blocks`: a random-config Llama with Llama-3.2-1B-shaped blocks (2048 wide, 8192
  MLP, 32 heads, 8 key/value heads), `--blocks` of them and a 32k vocabulary (the head is not
  what this measures), written once under `--cache` as a safetensors folder.

Printed per model: wall seconds in one process and on the cluster, the driver's peak RSS in
each, blocks handed out, MB moved per block task (inputs, output-gradients, extra `H`; the
weights are read by the workers from the file), seconds per task (median), seconds the driver
spent handing each task out, and whether every score of the two profiles is equal.

Usage: .venv/bin/python benchmarks/bench_distributed.py [--models smollm2,llama-1b-blocks]
    [--workers 2] [--blocks 3] [--grid "--bits 2,3,4 --terms 1 --group-size 128,channel --fractions 0"]
On 2 cores with the default grid: about 25 minutes (each model profiled twice).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_scale import SHAPES, run_stage, write_model  # noqa: E402

GRID = "--bits 2,3,4 --terms 1 --group-size 128,channel --fractions 0"
SUMMARY = re.compile(r"ray: (\d+) blocks scored on (\d+) CPUs, (\d+) per task, (\d+) MB moved per task, ([\d.]+) s"
                     r" per task \(median\), ([\d.]+) s handing each out")  # fmt: skip


def blocks_shape(blocks: int) -> tuple[str, str, dict]:
    config_cls, model_cls, shape = SHAPES["llama-1b"]
    return config_cls, model_cls, {**shape, "num_hidden_layers": blocks, "vocab_size": 32_000}


def scores(profile: Path) -> list:
    doc = json.loads(profile.read_text())
    return [(layer["spec"]["name"], [(o["loss"], o["loss_stderr"]) for o in layer["options"]])
            for layer in doc["layers"]]  # fmt: skip


def measure(name: str, model: str, opts: argparse.Namespace) -> dict:
    out: dict = {"name": name}
    for mode in ("alone", "ray"):
        profile = opts.cache / f"{name}.{mode}.profile.json"
        ray = ["--ray", f"local:{opts.workers}"] if mode == "ray" else []
        args = ["profile", model, "-o", str(profile), "--calibration", str(opts.calibration), *opts.grid.split(),
                *ray, "--no-progress"]  # fmt: skip
        print(f"[{name}] profile {mode} ...", flush=True)
        log = opts.cache / f"{name}.{mode}.log"
        seconds, rss = run_stage(args, log)
        out[mode] = {"seconds": seconds, "rss": rss, "profile": profile}
        print(f"[{name}] {mode}: {seconds:.0f} s, driver peak RSS {rss / 1e9:.2f} GB", flush=True)
        found = SUMMARY.search(log.read_text())
        if mode == "ray":
            if found is None:
                raise SystemExit(f"no cluster summary in {log}")
            out["tasks"], out["cpus"], out["threads"], out["mb"] = (int(found[i]) for i in (1, 2, 3, 4))
            out["task_s"], out["handout_s"] = float(found[5]), float(found[6])
    out["equal"] = scores(out["alone"]["profile"]) == scores(out["ray"]["profile"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,llama-1b-blocks")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=3, help="blocks of the 1B-shaped model")
    parser.add_argument("--calibration", type=int, default=32, help="calibration windows of 512 tokens")
    parser.add_argument("--grid", default=GRID, help="options of `allocator profile` narrowing the choice grid")
    parser.add_argument("--cache", type=Path, default=ROOT / "out" / "bench_distributed")
    opts = parser.parse_args()
    opts.cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in opts.models.split(","):
        if name == "smollm2":
            model = "smollm2"
        elif name == "llama-1b-blocks":
            model = str(write_model(name, opts.cache / f"llama-1b-{opts.blocks}blocks", blocks_shape(opts.blocks)))
        else:
            raise SystemExit(f"unknown model {name!r}; choose from smollm2, llama-1b-blocks")
        rows.append(measure(name, model, opts))
    print("\n| model | one process: wall s, driver peak GB | Ray local: wall s, driver peak GB | block tasks |"
          " MB per task | s per task (median) | s handing out per task | scores equal |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["alone"], r["ray"]
        tasks = f"{r['tasks']} on {r['cpus']} CPUs, {r['threads']} per task"
        print(f"| {r['name']} | {a['seconds']:.0f}, {a['rss'] / 1e9:.2f} | {b['seconds']:.0f}, {b['rss'] / 1e9:.2f}"
              f" ({b['seconds'] / a['seconds']:.2f}x) | {tasks} | {r['mb']} | {r['task_s']:.1f} |"
              f" {r['handout_s']:.2f} | {'yes' if r['equal'] else 'NO'} |")  # fmt: skip


if __name__ == "__main__":
    main()
