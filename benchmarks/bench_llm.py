"""A built-in LLM, SmolLM2-135M-Instruct (`smollm2`, default) or Gemma 3 270M (`--model gemma3`):
profile time and memory, GPTQ stack speed, and plans at 3.0 / 3.5 / 4.25 bits per weight against
the best uniform setting and HQQ.

Prints, from one run on this machine:
1. `allocator profile MODEL` (default grid and rounding for causal LMs: gptq-act on
   Hadamard-rotated weights; fisher, block-streamed): wall time,
   peak resident memory of the process, and the ratio of its time to one forward+backward
   pass over the same calibration windows;
2. one layer's GPTQ error stack, default grid (28 stack rows), one thread, for the three
   decoder shapes (rows x cols);
3. per budget, `allocator solve` + `allocator evaluate --peers minmax,hqq`: perplexity on the
   held-out windows of the news text, and after a slash on 16 windows of Wikipedia articles
   (text of another domain, never calibrated on), of FP, the plan, the best fitting uniform
   setting, the best plain min/max round-to-nearest and the best HQQ setting (decoder Linear
   layers planned; embedding and LM head kept; bits per weight with scales and zero points),
   and the plan's KL per window: predicted, measured on the calibration windows, measured held out and on Wikipedia;
4. with `--uniform`: every layer at one setting (int3/int4 x g64/g128/channel), perplexity
   of each rounding: the default (gptq-act on Hadamard-rotated weights), GPTQ as published
   (activation order and sequential calibration, no rotation), the project's RTN, plain
   min/max RTN and HQQ, with the seconds each took to apply.

With `--refine STEPS` every plan takes block reconstruction (`allocator solve --refine`), with
`--tune STEPS` end-to-end tuning of its scales (`allocator solve --tune`), and the table also
shows the plan as rounded, without them, measured in the same run; `--calibration N` takes N
calibration windows instead of the default 32 (the held-out windows change with it) and
`--score-on N` scores on N of them instead of the default 8 (GPTQ's `H` reads them all).

Usage: .venv/bin/python benchmarks/bench_llm.py [--model smollm2|gemma3] [--budgets 3.0,3.5,4.25] [--out DIR]
       [--skip-plans]
       [--method gptq|gptq-act|rtn] [--rotation none|hadamard|both] [--profile PROFILE.json] [--uniform]
       [--calibration N] [--score-on N] [--refine STEPS] [--tune STEPS]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from cli_runs import allocator, best, value  # benchmarks/ (scripts run from their folder)


def forward_backward_seconds(model_name: str, calibration: int | None = None) -> tuple[float, int]:
    """One forward+backward pass of the model over its calibration windows, and the tokens."""
    import torch

    from allocator.sources import load_data, load_model

    loaded = load_model(model_name)
    data = load_data(loaded, calibration=calibration)
    model = loaded.model
    start = time.perf_counter()
    for batch in data.calib:
        out = loaded.task.forward(model, batch)
        (out * torch.randn_like(out)).sum().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start, sum(int(b["input_ids"].numel()) for b in data.calib)


def gptq_stack_seconds() -> list[tuple[str, float]]:
    import torch

    from profilers.quant.options import choice_grid, expand_choices, layout_options
    from profilers.quant.rounding import error_stack

    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = []
    for rows, cols in ((576, 576), (1536, 576), (576, 1536)):
        w = torch.randn(rows, cols) * 0.02
        x = torch.randn(4096, cols)
        stack = layout_options(expand_choices(choice_grid(), 8), rows).stack
        start = time.perf_counter()
        error_stack(w, stack, method="gptq", hessian=x.T @ x)
        out.append((f"{rows}x{cols}, {len(stack)} stack rows", time.perf_counter() - start))
    torch.set_num_threads(2)
    return out


UNIFORM = ("int3-g64", "int3-g128", "int3-ch", "int4-g64", "int4-g128", "int4-ch")
# label -> (method, rotated, sequential) of the project's own roundings
ROUNDINGS = {
    "default": ("gptq-act", True, False),
    "published": ("gptq-act", False, True),  # GPTQ as published: act-order + sequential, no rotation
    "rtn": ("rtn", False, False),
}


def uniform_table(model_name: str) -> None:
    """Perplexity of each rounding with every planned layer at one setting (step 4)."""
    import copy

    import torch

    from allocator.measure.metrics import perplexity_of
    from allocator.measure.peers import round_layers_
    from allocator.quantized.apply import apply_choices_
    from allocator.sources import load_data, load_model
    from profilers.layers import find_targets
    from profilers.types import Choice

    loaded = load_model(model_name)
    data = load_data(loaded)
    model, task = loaded.model, loaded.task
    names = [t.spec.name for t in find_targets(model, exclude=loaded.keep)]

    def ppl(m: torch.nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            return float(perplexity_of([task.forward(m, b) for b in data.evals], data.evals))

    print(f"uniform settings on {len(names)} layers; FP perplexity {ppl(model):.2f}")
    labels = [*ROUNDINGS, "min/max RTN", "HQQ"]
    print(f"{'setting':>10} | " + " | ".join(f"{label:>14}" for label in labels))
    for label in UNIFORM:
        cells = []
        for method, rotated, sequential in ROUNDINGS.values():
            choice = Choice.parse(label).model_copy(update={"rotated": rotated})
            start = time.perf_counter()
            q = apply_choices_(copy.deepcopy(model), dict.fromkeys(names, choice), method=method,
                               calibration=data.calib, task=task, sequential=sequential)  # fmt: skip
            seconds = time.perf_counter() - start  # to apply; the perplexity pass is not counted
            cells.append(f"{ppl(q):8.2f} {seconds:4.0f}s")
            del q
        c = Choice.parse(label)
        for peer in ("minmax", "hqq"):
            start = time.perf_counter()
            q = round_layers_(copy.deepcopy(model), names, peer, c.bits, c.group_size)
            seconds = time.perf_counter() - start
            cells.append(f"{ppl(q):8.2f} {seconds:4.0f}s")
            del q
        print(f"{label:>10} | " + " | ".join(f"{cell:>14}" for cell in cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "gemma3"), help="the built-in LLM")
    parser.add_argument("--budgets", default="3.0,3.5,4.25", help="bits per weight, comma-separated")
    parser.add_argument("--out", type=Path, default=None, help="keep the profile, plans and JSON here")
    parser.add_argument("--profile", type=Path, default=None, help="reuse this profile (skips step 1)")
    parser.add_argument("--skip-plans", action="store_true", help="only steps 1 and 2")
    parser.add_argument("--method", default=None, help="rounding: rtn, gptq or gptq-act (default: the CLI's, gptq-act)")
    parser.add_argument("--rotation", default=None, help="none, hadamard or both (default: the CLI's, hadamard)")
    parser.add_argument("--uniform", action="store_true", help="also step 4, the uniform table (about 30 min)")
    parser.add_argument("--calibration", type=int, default=None, help="calibration windows (default: the CLI's, 32)")
    parser.add_argument("--score-on", type=int, default=None, help="windows the scores read (default: the CLI's, 8)")
    parser.add_argument("--refine", type=int, default=0, help="block reconstruction steps per block (default 0)")
    parser.add_argument("--tune", type=int, default=0, help="end-to-end tuning steps (default 0)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-llm-"))
    out.mkdir(parents=True, exist_ok=True)

    profile = args.profile or out / "profile.json"
    if args.profile is None:
        method = ["--method", args.method] if args.method else []
        rotation = ["--rotation", args.rotation] if args.rotation else []
        calibration = ["--calibration", str(args.calibration)] if args.calibration else []
        scored = ["--score-on", str(args.score_on)] if args.score_on else []
        _, seconds = allocator("profile", args.model, *method, *rotation, *calibration, *scored, "-o", str(profile))
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the profile is the first child
        fb, tokens = forward_backward_seconds(args.model, args.calibration)
        table = json.loads(profile.read_text())
        print(
            f"profile {args.model}: {seconds:.0f}s ({seconds / 60:.1f} min), peak RSS {peak / 1e9:.2f} GB;"
            f" {len(table['layers'])} layers x {len(table['layers'][0]['options'])} options,"
            f" {table['settings'].get('blocks')} blocks, {tokens} calibration tokens"
        )
        print(f"one forward+backward pass over them: {fb:.1f}s; profile / pass = {seconds / fb:.0f}x")
    for label, seconds in gptq_stack_seconds():
        print(f"GPTQ error stack {label}, 1 thread: {seconds:.2f}s")
    if args.skip_plans:
        return

    after = args.refine or args.tune
    print("perplexity on the held-out news windows / on 16 windows of Wikipedia articles (never calibrated on);"
          " KL per window predicted / on the scored calibration windows / held out / Wikipedia")  # fmt: skip
    rounded = f" {'as rounded':>13} |" if after else ""
    header = (f"{'bpw':>5} | {'FP':>13} | {'plan':>13} |{rounded}"
              f" {'best uniform':>30} | {'best min/max RTN':>32}"
              f" | {'best HQQ':>32} | {'KL pred/calib/held-out/wiki':>28} | evaluate")  # fmt: skip
    lines = [header, "-" * len(header)]
    for bpw in args.budgets.split(","):
        plan = out / f"plan-{bpw}bpw.json"
        allocator("solve", "-p", str(profile), "--budget", f"{bpw}bpw", "--refine", str(args.refine),
                  "--tune", str(args.tune), "-o", str(plan))  # fmt: skip
        text, seconds = allocator("evaluate", str(plan), "--json", "--peers", "minmax,hqq", "--uniform", "2")
        doc = json.loads(text)
        (out / f"evaluate-{bpw}bpw.json").write_text(json.dumps(doc, indent=1))
        rows = doc["rows"]
        fp = next(r for r in rows if r["kind"] == "fp")
        planned = next(r for r in rows if r["kind"] == "plan")
        unrefined = next((r for r in rows if r["label"].startswith("plan without")), None)
        bare = "" if unrefined is None else f" {value(unrefined, 'perplexity'):>13} |"
        checked = unrefined or planned  # the prediction is the rounding's, without --refine and --tune
        wiki = checked.get("elsewhere") or {}
        lines.append(
            f"{float(bpw):>5.2f} | {value(fp, 'perplexity'):>13} | {value(planned, 'perplexity'):>13} |{bare}"
            f" {best(rows, 'uniform', 'perplexity'):>30} | {best(rows, 'peer', 'perplexity', 'RTN'):>32}"
            f" | {best(rows, 'peer', 'perplexity', 'HQQ'):>32}"
            f" | {planned['predicted_loss']:5.1f} / {doc['plan_loss_on_calibration']:5.1f}"
            f" / {checked['divergence']:5.1f} / {wiki.get('divergence', float('nan')):5.1f}"
            f" | {seconds:.0f}s"
        )
        print(lines[-1], flush=True)
    print("\n".join(lines))
    print(f"files in {out}")
    if args.uniform:
        uniform_table(args.model)


if __name__ == "__main__":
    main()
