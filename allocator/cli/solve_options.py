"""The options only `allocator solve` takes (the shared ones are in `options`)."""

from typing import Annotated

import typer

__all__ = ["Forbids", "MaxLoss", "Pins", "RefineSteps", "Server", "Ties", "TuneSteps"]

MaxLoss = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        metavar="EPS",
        help="Lossless mode: the smallest plan whose predicted loss is at most EPS (in the profile's units).",
    ),
]
Pins = Annotated[
    list[str] | None,
    typer.Option(
        metavar="LAYER=CHOICE", help="Give matching layers this choice, e.g. 'classifier*=int8-ch'. Repeatable."
    ),
]
Forbids = Annotated[
    list[str] | None,
    typer.Option(
        metavar="LAYER=CHOICES", help="Keep matching layers off these choices, e.g. '*=int2*'. Repeatable."
    ),
]
Ties = Annotated[
    list[str] | None,
    typer.Option(
        metavar="TIE",
        help="Layers that must share one choice: 'qkv', 'gate_up', or patterns joined by '|'. Repeatable.",
    ),
]
RefineSteps = Annotated[
    int,
    typer.Option(
        min=0,
        metavar="STEPS",
        help="Block reconstruction after the rounding, recorded in the plan (apply, evaluate): each block's codes,"
        " scales and offsets tuned for STEPS signed-gradient steps so the block, fed the quantized blocks before"
        " it, reproduces the FP block's output (AutoRound-style; the profile does not price it). It needs"
        " enough calibration data: on SmolLM2-135M with the default 32 windows, 64 steps lowered held-out"
        " perplexity 0.6% at 13s per block; with --calibration 8 it overfits them. Use 64 or more."
        " [default: 0, none]",
    ),
]
TuneSteps = Annotated[
    int,
    typer.Option(
        min=0,
        metavar="STEPS",
        help="End-to-end tuning after the rounding (and any --refine), recorded in the plan (apply, evaluate):"
        " every layer's group scales and offsets tuned together for STEPS Adam steps, one calibration batch"
        " each, so the whole model's output matches the FP model's (KL for causal LMs; the profile does not"
        " price it). Codes stay as rounded. On SmolLM2-135M at 3.5 bpw, 64 steps lowered held-out perplexity"
        " 3.8% (4.25 bpw: 2.4%, 3.0 bpw: 6.8%) in about 11 minutes. [default: 0, none]",
    ),
]
Server = Annotated[
    str | None,
    typer.Option(
        metavar="URL", help="Solve on an `allocator serve` server (needs --profile), e.g. http://127.0.0.1:8000."
    ),
]
