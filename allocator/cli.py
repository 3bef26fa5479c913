"""Command line: `allocator profile`, `allocator solve`.

Errors a user can fix print one line (`error: ...`) and exit with status 2; an output file is
written only when its command succeeds, and atomically.
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console

from profilers.specs import ProfileTable

from . import __version__
from .budget import Budget
from .errors import USER_ERRORS, AllocatorError
from .report import Reporter

app = typer.Typer(
    name="allocator",
    help="Budgeted mixed-precision, multi-term post-training quantization for PyTorch models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
_out = Console()
if not _out.is_terminal:  # piped or captured: keep table rows on one line
    _out = Console(width=140)
report = Reporter(_out, Console(stderr=True))

# Options shared by `profile` and `solve`, defined once.
_MODEL_HELP = (
    "Built in: 'minilm' or 'lenet-mnist'; a Hugging Face model folder; a torch.save(model) file;"
    " or package.module:function returning the model. [default: minilm]"
)
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", metavar="NAME|PATH", help=_MODEL_HELP)]
ModelArg = Annotated[str | None, typer.Argument(metavar="MODEL", help=_MODEL_HELP, show_default=False)]
DataOpt = Annotated[
    str | None,
    typer.Option(
        metavar="PATH",
        help="Text file (a document per line) or folder of .txt files, for text models; a tensor file"
        " (.pt/.npy/.npz/.safetensors: inputs, optionally labels); or an image folder (a subfolder per class)."
        " [default: lee_background.cor; lenet-mnist: its MNIST images]",
    ),
]
ProfilerOpt = Annotated[str, typer.Option(help="Sensitivity estimator: fisher, hessian or measured.")]
MethodOpt = Annotated[
    str,
    typer.Option(help="Rounding under every term: rtn (round to nearest) or gptq (second-order error feedback)."),
]
BitsOpt = Annotated[
    str | None,
    typer.Option(help="Bit widths to consider, comma-separated (2-8). [default: 2,3,4,5,6,8; up to --device-bits]"),
]
TermsOpt = Annotated[
    str | None,
    typer.Option(help="Residual term counts (bits x terms <= 8). [default: 1,2; with --device-bits: 1,2,3,4]"),
]
KindsOpt = Annotated[
    str | None,
    typer.Option(
        metavar="KINDS",
        help="How multi-term choices relate: residual, tied (one scale, a finer grid), joint (refined together)."
        " [default: residual; with --device-bits: residual,tied]",
    ),
]
DeviceOpt = Annotated[
    int | None,
    typer.Option(
        min=2,
        max=8,
        metavar="BITS",
        help="Low-bit-only hardware: no term wider than BITS and no fp16; precision comes from more terms.",
    ),
]
GroupOpt = Annotated[
    str, typer.Option("--group-size", help="Group sizes along a row, or 'channel' (one group per row).")
]
FractionsOpt = Annotated[
    int, typer.Option(help="Also offer k/N of a layer's rows one more term, k = 1..N-1 (0: whole terms only).")
]
KeepOpt = Annotated[
    list[str] | None, typer.Option(metavar="PATTERN", help="Layer-name pattern to keep in fp16 (fnmatch). Repeatable.")
]
CalibrationOpt = Annotated[
    int, typer.Option(help="Calibration documents, images or samples (the rest are held out for evaluation).")
]
MaxLengthOpt = Annotated[int, typer.Option(help="Tokens per document.")]
BatchOpt = Annotated[int, typer.Option(help="Documents per batch.")]
DrawsOpt = Annotated[int | None, typer.Option(help="Pseudo-label draws per batch (fisher: 2, hessian: 1).")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the calibration split and pseudo-labels.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]
MetricOpt = Annotated[
    str | None,
    typer.Option(
        help="Rank by: cosine, accuracy, agreement, perplexity, wordsim or kl."
        " [default: cosine for encoders, perplexity for causal LMs, accuracy with labels, else agreement]"
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(envvar="ALLOCATOR_TOKEN", show_envvar=True, help="Bearer token of the server."),
]


@dataclass
class _Setup:
    loaded: Any
    data: Any  # models.Data

    @property
    def calib(self) -> list:
        return self.data.calib


def _setup(
    model: str | None, data: str | None, calibration: int, seed: int, max_length: int, batch_size: int
) -> _Setup:
    from . import models

    loaded = models.load_model(model or models.DEFAULT_MODEL)
    found = models.load_data(
        loaded, data, calibration=calibration, seed=seed, max_length=max_length, batch_size=batch_size
    )
    detail = f", {max_length} tokens" if found.unit == "documents" else ""
    report.line(
        f"model {loaded.name} ({loaded.kind}); calibration: {found.n_calib} {found.unit} of {found.source}{detail}"
    )
    return _Setup(loaded, found)


def _grid(
    bits: str | None, terms: str | None, group_size: str, device_bits: int | None, kinds: str | None = None
) -> tuple[list, dict]:
    """The whole-term choices to profile, and the fraction limits that go with them."""
    from .api import DEFAULT_BITS, choice_grid

    kind_list = [k.strip() for k in kinds.split(",") if k.strip()] if kinds else None
    for k in kind_list or []:
        if k not in ("residual", "tied", "joint"):
            raise AllocatorError(f"--kinds takes residual, tied and joint, got {k!r}")
    if device_bits is None:
        bit_list = _parse_ints(bits, "bits") if bits else list(DEFAULT_BITS)
        term_list = _parse_ints(terms, "terms") if terms else [1, 2]
        grid = choice_grid(bit_list, term_list, _parse_groups(group_size), kinds=kind_list or ["residual"])
        return grid, {}
    bit_list = _parse_ints(bits, "bits") if bits else [b for b in DEFAULT_BITS if b <= device_bits]
    if any(b > device_bits for b in bit_list):
        raise AllocatorError(f"--bits {bits} has widths above --device-bits {device_bits}")
    term_list = _parse_ints(terms, "terms") if terms else [1, 2, 3, 4]
    limit = device_bits * max(term_list)
    grid = choice_grid(
        bit_list, term_list, _parse_groups(group_size), kinds=kind_list or ["residual", "tied"], max_bits=limit
    )
    return grid, {"fraction_terms": max(term_list), "fraction_bits": limit}


def _parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AllocatorError(f"--{what} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise AllocatorError(f"--{what} is empty")
    return values


def _parse_groups(text: str) -> list[int | None]:
    out: list[int | None] = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        if part in ("channel", "ch", "row"):
            out.append(None)
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        else:
            raise AllocatorError(f"--group-size takes positive integers or 'channel', got {part!r}")
    if not out:
        raise AllocatorError("--group-size is empty")
    return out


def _run_profile(
    setup: _Setup,
    *,
    profiler: str,
    choices: list,
    fractions: int,
    keep: list[str] | None,
    draws: int | None,
    seed: int,
    progress: bool,
    method: str = "rtn",
    fraction_limits: dict | None = None,
) -> tuple[ProfileTable, float]:
    from . import api

    if fractions < 0:
        raise AllocatorError(f"--fractions must be 0 or more, got {fractions}")
    started = time.perf_counter()
    with report.progress(progress) as update:
        table = api.profile(
            setup.loaded.model,
            setup.calib,
            task=setup.loaded.task,
            profiler=profiler,
            choices=choices,
            fractions=fractions,
            exclude=keep or (),
            draws=draws,
            seed=seed,
            model_name=setup.loaded.name,
            progress=update,
            method=method,
            **(fraction_limits or {}),
        )
    table = table.model_copy(update={"data": setup.data.split()})
    return table, time.perf_counter() - started


@app.command()
def profile(
    model: ModelArg = None,
    output: Annotated[
        Path, typer.Option("--output", "-o", metavar="PROFILE.json", help="Write the profile (JSON) here.")
    ] = Path("profile.json"),
    data: DataOpt = None,
    profiler: ProfilerOpt = "fisher",
    method: MethodOpt = "gptq",
    bits: BitsOpt = None,
    terms: TermsOpt = None,
    group_size: GroupOpt = "64,128,channel",
    fractions: FractionsOpt = 8,
    kinds: KindsOpt = None,
    device_bits: DeviceOpt = None,
    keep: KeepOpt = None,
    calibration: CalibrationOpt = 64,
    max_length: MaxLengthOpt = 128,
    batch_size: BatchOpt = 16,
    draws: DrawsOpt = None,
    seed: SeedOpt = 0,
    validate: Annotated[
        bool,
        typer.Option(
            "--validate/--no-validate", help="Compare the estimates with measured divergence and store the result."
        ),
    ] = False,
    validate_pairs: Annotated[int, typer.Option(help="(layer, option) pairs measured by --validate.")] = 64,
    validate_plans: Annotated[int, typer.Option(help="Random whole-model plans measured by --validate.")] = 20,
    progress: ProgressOpt = True,
) -> None:
    """Estimate cost and sensitivity of every (layer, option) once; solve any budget from the file."""
    from .validation import validate_profile

    setup = _setup(model, data, calibration, seed, max_length, batch_size)
    choices, limits = _grid(bits, terms, group_size, device_bits, kinds)
    table, seconds = _run_profile(
        setup,
        profiler=profiler,
        choices=choices,
        fractions=fractions,
        keep=keep,
        draws=draws,
        seed=seed,
        progress=progress,
        method=method,
        fraction_limits=limits,
    )
    report.profile(table, seconds)
    if validate:
        with report.progress(progress) as update:
            v = validate_profile(
                setup.loaded.model,
                setup.calib,
                table,
                setup.loaded.task,
                pairs=validate_pairs,
                plans=validate_plans,
                seed=seed,
                progress=update,
            )
        table = table.model_copy(update={"validation": v})
        report.validation(v, table.profiler)
    table.save(output)
    report.line(f"profile written to {output}")


def _pairs(values: list[str] | None, option: str) -> tuple[tuple[str, str], ...]:
    out = []
    for v in values or []:
        left, sep, right = v.partition("=")
        if not sep or not left or not right:
            raise AllocatorError(f"{option} takes LAYER-PATTERN=CHOICE, got {v!r} (e.g. 'classifier*=int8-ch')")
        out.append((left, right))
    return tuple(out)


@app.command()
def solve(
    budget: Annotated[
        list[str] | None,
        typer.Option(
            "--budget",
            "-b",
            metavar="BUDGET",
            help="Budget: 12MB / 300MiB / 0.3GB (whole model), 3.5bpw, 25% (of fp16 size), 40GBOPs. Repeatable.",
        ),
    ] = None,
    max_loss: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            metavar="EPS",
            help="Lossless mode: the smallest plan whose predicted loss is at most EPS (in the profile's units).",
        ),
    ] = None,
    profile_file: Annotated[
        Path | None,
        typer.Option(
            "--profile", "-p", metavar="PROFILE.json", help="Solve from this profile instead of profiling now."
        ),
    ] = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", metavar="PLAN.json", help="Write the plan (JSON) here.")
    ] = None,
    evaluate: Annotated[
        bool, typer.Option("--evaluate/--no-evaluate", help="Measure FP, plan and uniform settings on held-out data.")
    ] = False,
    metric: MetricOpt = None,
    profiler: ProfilerOpt = "fisher",
    method: MethodOpt = "gptq",
    bits: BitsOpt = None,
    terms: TermsOpt = None,
    group_size: GroupOpt = "64,128,channel",
    fractions: FractionsOpt = 8,
    kinds: KindsOpt = None,
    device_bits: DeviceOpt = None,
    keep: KeepOpt = None,
    pin: Annotated[
        list[str] | None,
        typer.Option(
            metavar="LAYER=CHOICE", help="Give matching layers this choice, e.g. 'classifier*=int8-ch'. Repeatable."
        ),
    ] = None,
    forbid: Annotated[
        list[str] | None,
        typer.Option(
            metavar="LAYER=CHOICES", help="Keep matching layers off these choices, e.g. '*=int2*'. Repeatable."
        ),
    ] = None,
    tie: Annotated[
        list[str] | None,
        typer.Option(
            metavar="TIE",
            help="Layers that must share one choice: 'qkv', 'gate_up', or patterns joined by '|'. Repeatable.",
        ),
    ] = None,
    calibration: CalibrationOpt = 64,
    max_length: MaxLengthOpt = 128,
    batch_size: BatchOpt = 16,
    draws: DrawsOpt = None,
    seed: SeedOpt = 0,
    solver: Annotated[str, typer.Option(help="auto, greedy, cpsat, milp, lp or exhaustive.")] = "auto",
    gap: Annotated[float, typer.Option(help="Relative optimality gap accepted as optimal.")] = 1e-6,
    time_limit: Annotated[float, typer.Option(help="Seconds for exact work (CP-SAT, HiGHS).")] = 10.0,
    server: Annotated[
        str | None,
        typer.Option(
            metavar="URL", help="Solve on an `allocator serve` server (needs --profile), e.g. http://127.0.0.1:8000."
        ),
    ] = None,
    token: TokenOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Plan bits and terms per layer within the budget (profiling first unless --profile), compare with uniform."""

    from .plan import Constraints
    from .planning import plan_from_profile

    budgets = [Budget.parse(b) for b in budget or []]
    if not budgets and max_loss is None:
        raise AllocatorError("give a --budget (e.g. 12MB) or --max-loss")
    constraints = Constraints(
        pins=_pairs(pin, "--pin"),
        forbid=_pairs(forbid, "--forbid"),
        keep=tuple(keep or ()) if profile_file is not None else (),
        device_bits=device_bits,
        max_loss=max_loss,
    )
    times: dict[str, float] = {}
    setup = None
    if server is not None:
        _solve_on_server(server, token, profile_file, budgets, constraints, solver, gap, time_limit, output,
                         evaluate or model is not None or bool(tie))  # fmt: skip
        return
    if profile_file is not None:
        t0 = time.perf_counter()
        table = ProfileTable.load(profile_file)
        times["load profile"] = time.perf_counter() - t0
        if table.validation is not None and not table.validation.trustworthy:
            report.validation(table.validation, table.profiler)
        if evaluate or model is not None or tie:
            t0 = time.perf_counter()
            setup = _setup(model or table.model_name, data, calibration, seed, max_length, batch_size)
            _check_weights(table.model_fingerprint, setup.loaded, profile_file, "run allocator profile again")
            times["load"] = time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        setup = _setup(model, data, calibration, seed, max_length, batch_size)
        times["load"] = time.perf_counter() - t0
        choices, limits = _grid(bits, terms, group_size, device_bits, kinds)
        table, times["profile"] = _run_profile(
            setup,
            profiler=profiler,
            choices=choices,
            fractions=fractions,
            keep=keep,
            draws=draws,
            seed=seed,
            progress=progress,
            method=method,
            fraction_limits=limits,
        )
        report.profile(table, times["profile"])

    t0 = time.perf_counter()
    tie_names: list[list[str]] = []
    if tie:
        from profilers.layers import find_targets

        from .graph import build_graph, tie_groups

        assert setup is not None
        targets = find_targets(setup.loaded.model, exclude=keep or ())
        graph = build_graph(setup.loaded.model, targets, setup.calib[0], task=setup.loaded.task)
        profiled = set(table.names)
        tie_names = [[n for n in g if n in profiled] for g in tie_groups(graph, tie)]
    plan = plan_from_profile(
        table, budgets, ties=tie_names, constraints=constraints, solver=solver, gap=gap, time_limit=time_limit
    )
    times["solve"] = time.perf_counter() - t0
    report.plan(plan, table.quantizable_params)
    if output is not None:
        plan.save(output)
        report.line(f"plan written to {output}")

    if evaluate:
        assert setup is not None
        _, times["evaluate"] = _evaluate(setup, plan, table.fp16_bytes, progress, metric=metric)
    report.line("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))


def _solve_on_server(
    url: str,
    token: str | None,
    profile_file: Path | None,
    budgets: list[Budget],
    constraints: Any,
    solver: str,
    gap: float,
    time_limit: float,
    output: Path | None,
    needs_model: bool,
) -> None:
    from .client import Client

    if profile_file is None:
        raise AllocatorError("--server plans from a profile: pass --profile PROFILE.json (made by allocator profile)")
    if needs_model:
        raise AllocatorError("--evaluate, --model and --tie need the model here; drop them with --server")
    table = ProfileTable.load(profile_file)
    client = Client(url, token=token)
    t0 = time.perf_counter()
    profile_id = client.upload(table)
    plan = client.solve(
        profile_id, [b.text for b in budgets], constraints=constraints, solver=solver, gap=gap, time_limit=time_limit
    )
    report.plan(plan, table.quantizable_params)
    if output is not None:
        plan.save(output)
        report.line(f"plan written to {output}")
    report.line(f"time: solve on {url} {time.perf_counter() - t0:.2f}s (profile id {profile_id[:12]})")


def _evaluate(
    setup: _Setup,
    plan: Any,
    fp16_bytes: int,
    progress: bool,
    *,
    metric: str | None = None,
    peers: tuple[str, ...] = (),
    top_uniform: int = 3,
) -> tuple[Any, float]:
    """Measure FP, the plan, uniform settings and peers on the held-out data; print the table."""
    from . import models
    from .apply import layer_hessians
    from .evaluate import METRICS, compare, default_uniform, wordsim_spearman
    from .peers import peer_variants

    if metric is not None and metric not in METRICS:
        raise AllocatorError(f"--metric takes {', '.join(METRICS)}, got {metric!r}")
    started = time.perf_counter()
    loaded = setup.loaded
    words = None
    if loaded.task.output == "embedding" and loaded.tokenizer is not None:
        pairs = models.wordsim353()
        words = lambda m: wordsim_spearman(m, loaded.tokenizer, loaded.task, pairs)  # noqa: E731
    uniform = default_uniform(plan, top=top_uniform)
    variants, skipped = peer_variants(peers, loaded.model, plan, setup.calib, loaded.task)
    labels = ["FP", "plan", *(f"uniform {u.choice.label}" for u in uniform), *(v.label for v in variants)]
    with report.progress(progress) as update:
        hessians = layer_hessians(loaded.model, setup.calib, loaded.task) if plan.method == "gptq" else None
        cmp = compare(
            loaded.model,
            plan,
            setup.data.evals,
            loaded.task,
            uniform=uniform,
            words=words,
            fp_bytes=fp16_bytes,
            progress=lambda label: update("measuring", labels.index(label), len(labels)),
            hessians=hessians,
            peers=variants,
            skipped=skipped,
            metric=metric,
        )
    report.comparison(cmp, f"{setup.data.n_eval} held-out {setup.data.unit}", fp16_bytes, plan)
    return cmp, time.perf_counter() - started


def _setup_recorded(
    model: str | None,
    recorded: Any,
    data: str | None,
    calibration: int | None,
    seed: int | None,
    max_length: int | None,
    batch_size: int | None,
) -> _Setup:
    """Load the model and data; each data option not given is taken from the split a profile or
    plan recorded (`DataSplit`), else from the usual default."""
    if recorded is not None:
        data = data if data is not None or recorded.builtin else recorded.source
        calibration = recorded.calibration if calibration is None else calibration
        seed = recorded.seed if seed is None else seed
        max_length = recorded.max_length if max_length is None else max_length
        batch_size = recorded.batch_size if batch_size is None else batch_size
    return _setup(
        model,
        data,
        64 if calibration is None else calibration,
        0 if seed is None else seed,
        128 if max_length is None else max_length,
        16 if batch_size is None else batch_size,
    )


def _model_and_plan(model: str | None, plan_file: Path | None) -> tuple[str | None, Path]:
    """`allocator CMD PLAN.json` (no model) reads the model from the plan."""
    if plan_file is None:
        if model is not None and model.endswith(".json"):
            return None, Path(model)
        return model, Path("plan.json")
    return model, plan_file


RecordedCalibration = Annotated[
    int | None, typer.Option(help="Calibration documents or images. [default: as the plan was profiled]")
]
RecordedSeed = Annotated[int | None, typer.Option(help="Seed of the calibration split. [default: the plan's]")]
RecordedLength = Annotated[int | None, typer.Option(help="Tokens per document. [default: the plan's]")]
RecordedBatch = Annotated[int | None, typer.Option(help="Documents per batch. [default: the plan's]")]
RecordedData = Annotated[
    str | None,
    typer.Option(
        metavar="PATH", help="Data to calibrate and evaluate on (see allocator profile --help). [default: the plan's]"
    ),
]
PlanModelArg = Annotated[
    str | None,
    typer.Argument(metavar="MODEL", help="The model the plan is for. [default: the plan's]", show_default=False),
]
PlanArg = Annotated[
    Path | None,
    typer.Argument(metavar="PLAN.json", help="The plan (allocator solve -o). [default: plan.json]", show_default=False),
]


def _check_weights(fingerprint: str, loaded: Any, made_file: Path, fix: str) -> None:
    """Refuse a profile or plan made for other weights than the loaded model's."""
    from profilers.layers import fingerprint_model

    if fingerprint_model(loaded.model) != fingerprint:
        raise AllocatorError(
            f"{made_file} was made for different weights than {loaded.name}'s (the model changed); {fix}"
        )


@app.command()
def evaluate(
    model: PlanModelArg = None,
    plan_file: PlanArg = None,
    data: RecordedData = None,
    calibration: RecordedCalibration = None,
    max_length: RecordedLength = None,
    batch_size: RecordedBatch = None,
    seed: RecordedSeed = None,
    metric: MetricOpt = None,
    peers: Annotated[
        str,
        typer.Option(help="Other quantizers at the plan's size, comma-separated: hqq, modelopt, or none."),
    ] = "hqq,modelopt",
    uniform: Annotated[int, typer.Option(min=0, help="Fitting uniform settings to measure, best predicted first.")] = 3,
    json_out: Annotated[bool, typer.Option("--json", help="Print the table as JSON (for machines) instead.")] = False,
    plot: Annotated[Path | None, typer.Option(metavar="PLOT.png", help="Also draw the comparison as a PNG.")] = None,
    progress: ProgressOpt = True,
) -> None:
    """Measure the plan against FP, the best uniform settings and other quantizers at the same size."""
    import json
    from dataclasses import asdict

    from .plan import Plan

    model, plan_path = _model_and_plan(model, plan_file)
    plan = Plan.load(plan_path)
    peer_names = tuple(p.strip().lower() for p in peers.split(",") if p.strip() and p.strip().lower() != "none")
    saved_out = report.out
    if json_out:
        report.out = report.err  # the JSON alone goes to stdout
    try:
        t0 = time.perf_counter()
        setup = _setup_recorded(model or plan.model_name or None, plan.data, data, calibration, seed, max_length,
                                batch_size)  # fmt: skip
        _check_weights(plan.model_fingerprint, setup.loaded, plan_path, "solve again for this model")
        loading = time.perf_counter() - t0
        if plan.method == "gptq" and plan.data is None and data is None:
            report.warn("the plan does not record its calibration data; GPTQ rounding uses the default split")
        from profilers.layers import fp16_bytes as model_fp16_bytes

        cmp, seconds = _evaluate(
            setup, plan, model_fp16_bytes(setup.loaded.model), progress, metric=metric, peers=peer_names,
            top_uniform=uniform,
        )  # fmt: skip
        if plot is not None:
            from .plots import plot_comparison

            plot_comparison(cmp, plot, title=f"{setup.loaded.name}: plan at {plan.predicted.bpw:.2f} bpw, measured")
            report.line(f"plot written to {plot}")
        report.line(f"time: load {loading:.1f}s, evaluate {seconds:.1f}s")
    finally:
        report.out = saved_out
    if json_out:
        best_u, best_p = cmp.best_uniform(fitting_only=True), cmp.best_peer()
        doc = {
            "model": setup.loaded.name,
            "plan": str(plan_path),
            "metric": cmp.metric,
            "held_out": {"items": setup.data.n_eval, "unit": setup.data.unit, "source": setup.data.source},
            "rows": [asdict(m) for m in cmp.rows],
            "best_uniform": best_u.label if best_u else None,
            "best_peer": best_p.label if best_p else None,
            "plan_beats_best_uniform": None if best_u is None else cmp.score(cmp.plan) > cmp.score(best_u),
            "plan_beats_best_peer": None if best_p is None else cmp.score(cmp.plan) > cmp.score(best_p),
            "skipped": cmp.skipped,
        }
        sys.stdout.write(json.dumps(doc, indent=1) + "\n")


@app.command()
def apply(
    model: PlanModelArg = None,
    plan_file: PlanArg = None,
    output: Annotated[
        Path, typer.Option("--output", "-o", metavar="OUT.safetensors", help="The packed model file to write.")
    ] = Path("model.allocator.safetensors"),
    check: Annotated[
        bool, typer.Option("--check/--no-check", help="Reload the file and compare it with the fake-quantized model.")
    ] = True,
    data: RecordedData = None,
    calibration: RecordedCalibration = None,
    max_length: RecordedLength = None,
    batch_size: RecordedBatch = None,
    seed: RecordedSeed = None,
) -> None:
    """Quantize the model by the plan and write it packed (safetensors; reload with allocator.load_quantized)."""
    import copy

    from . import models
    from .apply import apply_plan_
    from .budget import format_bytes
    from .export import export_quantized, load_quantized
    from .plan import Plan

    model, plan_file = _model_and_plan(model, plan_file)
    plan = Plan.load(plan_file)
    name = model or plan.model_name or models.DEFAULT_MODEL
    setup = None
    if plan.method == "gptq" or check:  # GPTQ rounds on the plan's calibration data; the check runs held-out data
        setup = _setup_recorded(name, plan.data, data, calibration, seed, max_length, batch_size)
        loaded = setup.loaded
    else:
        loaded = models.load_model(name)
    _check_weights(plan.model_fingerprint, loaded, plan_file, "solve again for this model")
    hessians = None
    if plan.method == "gptq":
        from profilers.base import fingerprint_batches

        from .apply import layer_hessians

        assert setup is not None
        if fingerprint_batches(setup.calib) != plan.data_fingerprint:
            raise AllocatorError(
                "this GPTQ plan was profiled on other calibration data; pass the same --data, --calibration,"
                " --seed, --max-length and --batch-size as when profiling"
            )
        hessians = layer_hessians(loaded.model, setup.calib, loaded.task)
    t0 = time.perf_counter()
    export_quantized(loaded.model, plan, output, rebuild=loaded.rebuild, hessians=hessians)
    seconds = time.perf_counter() - t0
    size = output.stat().st_size
    budget = plan.limits.get("bytes")
    within = (
        "" if budget is None else f"; budget {format_bytes(budget + plan.fixed_bytes + plan.predicted.file_overhead)}"
    )
    report.line(
        f"wrote {output}: {format_bytes(size)} on disk, plan predicted {format_bytes(plan.predicted.bytes)}"
        f" ({100 * (size / plan.predicted.bytes - 1):+.2f}%){within}; {seconds:.1f}s"
    )
    if check:
        assert setup is not None and loaded.task is not None
        reloaded = load_quantized(output)
        fake = apply_plan_(copy.deepcopy(loaded.model), plan, hessians=hessians)
        batch = setup.data.evals[0]
        with torch.no_grad():
            a, b = loaded.task.forward(fake, batch), loaded.task.forward(reloaded, batch)
        report.line(f"reloaded model vs fake-quantized model: max |difference| {float((a - b).abs().max()):.2e}")


@app.command()
def convert(
    plan_file: Annotated[Path, typer.Argument(metavar="PLAN.json", help="The plan to convert.", show_default=False)],
    to: Annotated[str, typer.Option("--to", help="gptqmodel (a QuantizeConfig with `dynamic`) or llama.cpp.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", metavar="FILE", help="Write here instead of printing.")
    ] = None,
) -> None:
    """Write the part of a plan other runtimes can express; notes say what had to be dropped."""
    import json

    from profilers.files import atomic_write_text

    from .formats import gptqmodel_dynamic, llama_cpp_tensor_types
    from .plan import Plan

    plan = Plan.load(plan_file)
    if to == "gptqmodel":
        config, notes = gptqmodel_dynamic(plan)
        text = json.dumps(config, indent=1) + "\n"
    elif to in ("llama.cpp", "llamacpp", "gguf"):
        lines, notes = llama_cpp_tensor_types(plan)
        text = "\n".join(lines) + "\n"
    else:
        raise AllocatorError(f"--to takes gptqmodel or llama.cpp, got {to!r}")
    if output is None:
        report.out.print(text, end="", highlight=False, soft_wrap=True, markup=False)
    else:
        atomic_write_text(output, text)
        report.line(f"written to {output}")
    for note in notes:
        report.warn(note)


@app.command()
def frontier(
    profile_file: Annotated[
        Path, typer.Option("--profile", "-p", metavar="PROFILE.json", help="The profile to sweep (allocator profile).")
    ],
    start: Annotated[str, typer.Option("--from", metavar="BUDGET", help="Smallest budget, e.g. 2bpw or 8MB.")],
    stop: Annotated[str, typer.Option("--to", metavar="BUDGET", help="Largest budget, of the same kind.")],
    points: Annotated[int, typer.Option(help="Budgets in the sweep.")] = 40,
    output: Annotated[
        Path, typer.Option("--output", "-o", metavar="FRONTIER.csv", help="CSV of plans and uniform settings.")
    ] = Path("frontier.csv"),
    plot: Annotated[Path | None, typer.Option(metavar="PLOT.png", help="PNG plot. [default: next to the CSV]")] = None,
    evaluate: Annotated[
        bool, typer.Option("--evaluate/--no-evaluate", help="Also measure every plan on held-out text (slow).")
    ] = False,
    model: ModelOpt = None,
    data: DataOpt = None,
    calibration: CalibrationOpt = 64,
    max_length: MaxLengthOpt = 128,
    batch_size: BatchOpt = 16,
    seed: SeedOpt = 0,
    solver: Annotated[str, typer.Option(help="auto, greedy, cpsat, milp, lp or exhaustive.")] = "auto",
    progress: ProgressOpt = True,
) -> None:
    """Sweep the budget: the optimal plan at each size, against every uniform setting (CSV + PNG)."""
    from .frontier import budget_sweep, plot_frontier, sweep, write_csv

    table = ProfileTable.load(profile_file)
    budgets = budget_sweep(Budget.parse(start), Budget.parse(stop), points)
    with report.progress(progress) as update:
        result = sweep(table, budgets, solver=solver, progress=update)
    if evaluate:
        import copy

        from .apply import apply_plan_
        from .evaluate import model_outputs

        setup = _setup(model or table.model_name, data, calibration, seed, max_length, batch_size)
        _check_weights(table.model_fingerprint, setup.loaded, profile_file, "run allocator profile again")
        loaded = setup.loaded
        evals = setup.data.evals
        reference = model_outputs(loaded.model, evals, loaded.task)
        from .apply import plan_hessians

        hessians = plan_hessians(loaded.model, result[0].plan, None, setup.calib, loaded.task)
        with report.progress(progress) as update:
            for k, point in enumerate(result):
                update("measuring", k, len(result))
                quantized = apply_plan_(copy.deepcopy(loaded.model), point.plan, hessians=hessians)
                outs = model_outputs(quantized, evals, loaded.task)
                div = [loaded.task.divergence(r, o, b).mean() for r, o, b in zip(reference, outs, evals, strict=True)]
                point.measured_loss = float(sum(float(d) for d in div) / len(div))
    write_csv(result, table, output)
    png = plot or output.with_suffix(".png")
    plot_frontier(result, table, png)
    best = ", ".join(f"{p.budget}: {p.plan.predicted.loss:.4g}" for p in result[:: max(1, len(result) // 5)])
    report.line(f"{len(result)} plans from {result[0].budget} to {result[-1].budget} (predicted loss {best})")
    report.line(f"frontier written to {output} and {png}")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
    data_dir: Annotated[
        Path, typer.Option(metavar="DIR", help="Where uploaded profiles are kept (survive restarts).")
    ] = Path("allocator-data"),
    token: TokenOpt = None,
    workers: Annotated[int, typer.Option(min=1, help="Solves running at once.")] = 2,
    max_time_limit: Annotated[float, typer.Option(min=0.01, help="Cap on a request's seconds of exact work.")] = 60.0,
    max_body_mb: Annotated[float, typer.Option(min=0.01, help="Largest request body, MB.")] = 64.0,
    max_options: Annotated[int, typer.Option(min=1, help="Largest profile, layers x options.")] = 2_000_000,
    max_budgets: Annotated[int, typer.Option(min=1, help="Most budgets in one solve.")] = 8,
    max_points: Annotated[int, typer.Option(min=2, help="Most points in one frontier.")] = 200,
    max_pending: Annotated[int, typer.Option(min=1, help="Solves running or queued; more get 503.")] = 1024,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve solve and frontier over HTTP (POST /v1/solve, /v1/frontier, /v1/profiles; GET /healthz, /docs)."""
    from .service import ServiceLimits
    from .service import serve as run_server

    limits = ServiceLimits(
        max_body_bytes=int(max_body_mb * 1e6),
        max_options=max_options,
        max_budgets=max_budgets,
        max_points=max_points,
        max_time_limit=max_time_limit,
        workers=workers,
        max_pending=max_pending,
    )
    run_server(host, port, data_dir=data_dir, token=token or None, limits=limits, log_level=log_level)


@app.command()
def version() -> None:
    """Print the version."""
    report.line(__version__)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    report.warn(str(message))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `allocator` command; returns the exit status."""
    warnings.showwarning = _show_warning
    try:
        app(args=argv, prog_name="allocator")
    except USER_ERRORS as e:
        report.err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        report.err.print("interrupted")
        return 130
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
