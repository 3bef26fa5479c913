"""The plan against the best uniform setting, HQQ and ModelOpt AutoQuantize on all-MiniLM-L6-v2.

The 36 encoder Linear layers are planned (embeddings kept FP, to compare like with like) at
3.0, 3.5 and 4.25 bits per weight, scales and zero points included. One profile; per budget one
`allocator solve` and one `allocator evaluate` run, whose JSON is summarised here: mean
embedding cosine to FP on the 236 held-out documents of lee_background.cor (128 tokens).

Usage: .venv/bin/python benchmarks/bench_peers.py [--budgets 3.0,3.5,4.25] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from cli_runs import allocator, best  # benchmarks/ (scripts run from their folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="3.0,3.5,4.25", help="bits per weight, comma-separated")
    parser.add_argument("--out", type=Path, default=None, help="keep the profile, plans and JSON here")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-peers-"))
    out.mkdir(parents=True, exist_ok=True)

    profile = out / "profile.json"
    t0 = time.perf_counter()
    allocator("profile", "--keep", "embeddings*", "-o", str(profile))
    print(f"profile (36 Linear layers, GPTQ on Hadamard-rotated weights, fisher): {time.perf_counter() - t0:.0f}s")

    header = (f"{'bpw':>5} | {'plan':>7} | {'best uniform':>24} | {'best min/max RTN':>24} | {'best HQQ':>24}"
              f" | {'ModelOpt AutoQuantize':>22}")  # fmt: skip
    lines = [header, "-" * len(header)]
    for bpw in args.budgets.split(","):
        plan = out / f"plan-{bpw}bpw.json"
        allocator("solve", "-p", str(profile), "--budget", f"{bpw}bpw", "-o", str(plan))
        t0 = time.perf_counter()
        doc = json.loads(allocator("evaluate", str(plan), "--json", "--plot", str(out / f"evaluate-{bpw}bpw.png"))[0])
        (out / f"evaluate-{bpw}bpw.json").write_text(json.dumps(doc, indent=1))
        rows = doc["rows"]
        planned = next(r for r in rows if r["kind"] == "plan")
        lines.append(
            f"{float(bpw):>5.2f} | {planned['cosine']:.4f} | {best(rows, 'uniform', 'cosine'):>24} |"
            f" {best(rows, 'peer', 'cosine', 'RTN'):>24} | {best(rows, 'peer', 'cosine', 'HQQ'):>24}"
            f" | {best(rows, 'peer', 'cosine', 'ModelOpt'):>22}"
        )
        print(f"{bpw} bpw: evaluate {time.perf_counter() - t0:.0f}s; skipped peers: {doc['skipped'] or 'none'}")
    print("\n".join(lines))
    print(f"files in {out}")


if __name__ == "__main__":
    main()
