"""The options commands share, declared once, with defaults taken from the code that owns them.

Groups of options travel as one dataclass (`DataOptions`, `GridOptions`, `SolverOptions`, ...):
a command names the group in its signature, `@with_options` spreads the group's fields into
CLI options, and the command receives the filled-in dataclass.
"""

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from profilers.estimators import DEFAULT_DRAWS, DEFAULT_PROFILER, PROFILER_NAMES
from profilers.quant.ggml.types import GGML_TYPES
from profilers.quant.options import (
    DEFAULT_BITS,
    DEFAULT_FRACTIONS,
    DEFAULT_GROUP_SIZES,
    DEFAULT_KINDS,
    DEFAULT_METHOD,
    DEFAULT_ROTATION,
    DEFAULT_TERMS,
    FORMATS,
    KINDS,
    LLM_METHOD,
    METHODS,
    ROTATIONS,
    SLOW_GGML_TYPES,
    choice_grid,
    ggml_grid,
)
from profilers.tasks import EXACT_CLASSES
from profilers.types import MAX_TERMS, QUANT_BITS, Choice
from solvers import METHODS as SOLVERS

from ..errors import AllocatorError
from ..measure import METRICS
from ..planning.budget import parse_size
from ..sources import (
    BUILTIN_MODELS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_CALIBRATION,
    DEFAULT_MAX_LENGTH,
    DEFAULT_MODEL,
    DEFAULT_SEED,
    LLM_BATCH_SIZE,
    LLM_CALIBRATION,
    LLM_EVALUATION,
    LLM_SCORED,
    LLM_WINDOW,
    MNIST_CALIBRATION,
)

__all__ = [
    "DataOptions",
    "GridOptions",
    "RecordedDataOptions",
    "SolverOptions",
    "with_options",
]


def _groups_text(groups: tuple[int | None, ...]) -> str:
    return ",".join("channel" if g is None else str(g) for g in groups)


def _ints(values: tuple[int, ...]) -> str:
    return ",".join(map(str, values))


_MODEL_HELP = (
    f"Built in: {' or '.join(map(repr, BUILTIN_MODELS))}; a Hugging Face model folder; a .gguf file (a causal LM);"
    f" a torch.save(model) file; or package.module:function returning the model. [default: {DEFAULT_MODEL}]"
)
Model = Annotated[str | None, typer.Option("--model", "-m", metavar="NAME|PATH", help=_MODEL_HELP)]
ModelArg = Annotated[str | None, typer.Argument(metavar="MODEL", help=_MODEL_HELP, show_default=False)]
PlanModelArg = Annotated[
    str | None,
    typer.Argument(metavar="MODEL", help="The model the plan is for. [default: the plan's]", show_default=False),
]
PlanModel = Annotated[
    str | None,
    typer.Option("--model", "-m", metavar="NAME|PATH", show_default=False,
                 help="The model the plan is for, as MODEL names it. [default: the plan's]"),
]
PlanArg = Annotated[
    Path | None,
    typer.Argument(metavar="PLAN.json", help="The plan (allocator solve -o). [default: plan.json]", show_default=False),
]
ProfileFile = Annotated[
    Path | None,
    typer.Option("--profile", "-p", metavar="PROFILE.json", help="Solve from this profile instead of profiling now."),
]
Budgets = Annotated[
    list[str] | None,
    typer.Option(
        "--budget", "-b", metavar="BUDGET",
        help="Budget: 12MB / 300MiB / 0.3GB (whole model), 3.5bpw, 25% (of fp16 size), 40GBOPs. Repeatable.",
    ),
]  # fmt: skip
Metric = Annotated[
    str | None,
    typer.Option(
        help=f"Rank by: {', '.join(METRICS)}."
        " [default: cosine for encoders, perplexity for causal LMs, accuracy with labels, else agreement]"
    ),
]
Progress = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]
Token = Annotated[
    str | None, typer.Option(envvar="ALLOCATOR_TOKEN", show_envvar=True, help="Bearer token of the server.")
]
_DATA_HELP = (
    "Text file (a document per line) or folder of .txt files, for text models (causal LMs read it as token"
    " windows); a tensor file (.pt/.npy/.npz/.safetensors: inputs, optionally labels); or an image folder"
    " (a subfolder per class); or a built-in text: news (lee_background.cor) or mix (news, Python code, Python's"
    " documentation and dialogue in ten languages, as token windows; causal LMs)."
)
# Options left out take the model's defaults (`sources.load_data`): causal LMs reading text get
# token windows, the other models documents, images or samples.
_CALIBRATION_HELP = (
    f"Calibration documents, images or samples (the rest are held out); causal LMs: token windows, at most"
    f" {LLM_EVALUATION} others held out. [default: {DEFAULT_CALIBRATION}; causal LMs: {LLM_CALIBRATION};"
    f" lenet-mnist: {MNIST_CALIBRATION}]"
)
_MAX_LENGTH_HELP = (
    f"Tokens per document; causal LMs: tokens per window. [default: {DEFAULT_MAX_LENGTH}; causal LMs: {LLM_WINDOW}]"
)
_BATCH_SIZE_HELP = (
    f"Documents, images, samples or windows per batch. [default: {DEFAULT_BATCH_SIZE}; causal LMs: {LLM_BATCH_SIZE}]"
)


@dataclasses.dataclass
class DataOptions:
    """Calibration data and how it is split from the held-out data."""

    data: Annotated[
        str | None,
        typer.Option(metavar="PATH", help=f"{_DATA_HELP} [default: news; lenet-mnist: its images]"),
    ] = None
    calibration: Annotated[int | None, typer.Option(min=1, help=_CALIBRATION_HELP, show_default=False)] = None
    max_length: Annotated[int | None, typer.Option(min=2, help=_MAX_LENGTH_HELP, show_default=False)] = None
    batch_size: Annotated[int | None, typer.Option(min=1, help=_BATCH_SIZE_HELP, show_default=False)] = None
    seed: Annotated[int, typer.Option(help="Seed of the calibration split and pseudo-labels.")] = DEFAULT_SEED
    score_on: Annotated[
        int | None,
        typer.Option(min=1, metavar="N", show_default=False,
                     help="Calibration items the sensitivity scores read, evenly spaced (rounded up to whole"
                          " batches); GPTQ's H reads every item, in the profile as in apply. Scores cost a"
                          " forward and backward pass per item, H a forward pass."
                          f" [default: all; causal LMs: {LLM_SCORED}]"),
    ] = None  # fmt: skip


@dataclasses.dataclass
class RecordedDataOptions:
    """The data options of a command that reads a plan: each one not given is the plan's."""

    data: Annotated[
        str | None, typer.Option(metavar="PATH", help=f"{_DATA_HELP} [default: the plan's]", show_default=False)
    ] = None
    calibration: Annotated[
        int | None, typer.Option(min=1, help="Calibration documents, images, samples or windows. [default: the plan's]")
    ] = None
    max_length: Annotated[
        int | None, typer.Option(min=2, help="Tokens per document or window. [default: the plan's]")
    ] = None
    batch_size: Annotated[int | None, typer.Option(min=1, help="Items per batch. [default: the plan's]")] = None
    seed: Annotated[int | None, typer.Option(help="Seed of the calibration split. [default: the plan's]")] = None

    def resolve(self, recorded: Any) -> DataOptions:
        """These options, each missing one taken from the recorded split (`DataSplit`), else left
        to the model's default (None: `sources.load_data` picks it)."""
        data = self.data
        if recorded is not None and data is None and not recorded.builtin:
            data = recorded.source
        elif recorded is not None and data is None and recorded.unit == "windows":  # a causal LM's built-in text
            data = recorded.corpus or "news"  # files made before the mix read the news

        def pick(given: Any, name: str, default: Any) -> Any:
            if given is not None:
                return given
            value = getattr(recorded, name, None) if recorded is not None else None
            return default if value is None else value

        return DataOptions(
            data=data,
            calibration=pick(self.calibration, "calibration", None),
            max_length=pick(self.max_length, "max_length", None),
            batch_size=pick(self.batch_size, "batch_size", None),
            seed=pick(self.seed, "seed", DEFAULT_SEED),
        )


_draws = ", ".join(f"{name}: {n}" for name, n in DEFAULT_DRAWS.items())
_draws_help = (f"Pseudo-label draws per batch ({_draws}); a classifier with at most {EXACT_CLASSES} classes"
               " takes one per class instead (the exact Fisher).")


@dataclasses.dataclass
class GridOptions:
    """What to profile: the estimator, the rounding, and the grid of choices per layer."""

    format: Annotated[
        str,
        typer.Option("--format", metavar="FORMAT",
                     help="What the plan is written as: native (allocator's packed safetensors file, the int... grid"
                          " below) or gguf (a GGUF file llama.cpp runs: each tensor in one of llama.cpp's block types"
                          " its rows can take, and fp16; byte budgets are the file's; the model must be a .gguf)."),
    ] = "native"  # fmt: skip
    types: Annotated[
        str | None,
        typer.Option("--types", metavar="TYPES",
                     help=f"With --format gguf: the block types to consider, comma-separated, of"
                          f" {', '.join(GGML_TYPES)}; or all. [default: every one the installed gguf package can"
                          f" write but {' and '.join(SLOW_GGML_TYPES)}, which llama.cpp runs 2x slower on CPUs]"),
    ] = None  # fmt: skip
    profiler: Annotated[
        str, typer.Option(help=f"Sensitivity estimator: {', '.join(PROFILER_NAMES)}.")
    ] = DEFAULT_PROFILER
    method: Annotated[
        str | None,
        typer.Option(help=f"Rounding under every term: {', '.join(METHODS)} (rtn: round to nearest;"
                          " gptq: second-order error feedback; gptq-act: GPTQ in activation order with static"
                          f" groups, best on LLMs). [default: {DEFAULT_METHOD}; causal LMs: {LLM_METHOD}]"),
    ] = None  # fmt: skip
    bits: Annotated[
        str | None,
        typer.Option(help=f"Bit widths to consider, comma-separated ({min(QUANT_BITS)}-{max(QUANT_BITS)})."
                          f" [default: {_ints(DEFAULT_BITS)}; up to --device-bits]"),
    ] = None  # fmt: skip
    terms: Annotated[
        str | None,
        typer.Option(help=f"Residual term counts (bits x terms <= 8). [default: {_ints(DEFAULT_TERMS)};"
                          " with --device-bits: 1,2,3,4]"),
    ] = None  # fmt: skip
    group_size: Annotated[
        str, typer.Option("--group-size", help="Group sizes along a row, or 'channel' (one group per row).")
    ] = _groups_text(DEFAULT_GROUP_SIZES)
    fractions: Annotated[
        int,
        typer.Option(min=0, help="Also offer k/N of a layer's rows one more term, k = 1..N-1 (0: whole terms only)."),
    ] = DEFAULT_FRACTIONS
    kinds: Annotated[
        str | None,
        typer.Option(metavar="KINDS", help=f"How multi-term choices relate: {', '.join(KINDS)} (tied: one scale, a"
                     f" finer grid; joint: refined together). [default: {','.join(DEFAULT_KINDS)};"
                     " with --device-bits: residual,tied]"),
    ] = None  # fmt: skip
    device_bits: Annotated[
        int | None,
        typer.Option(
            min=2,
            max=8,
            metavar="BITS",
            help="Low-bit-only hardware: no term wider than BITS and no fp16; precision comes from more terms.",
        ),
    ] = None
    keep: Annotated[
        list[str] | None,
        typer.Option(
            metavar="PATTERN",
            help="Layer-name pattern to keep in fp16 (fnmatch). Repeatable. [default: none; causal LMs keep their"
            " input embedding and output head, e.g. model.embed_tokens and lm_head, unless --keep is given]",
        ),
    ] = None
    draws: Annotated[int | None, typer.Option(min=1, help=_draws_help)] = None
    rotation: Annotated[
        str | None,
        typer.Option(help=f"Rotate each layer's input space by a randomized Hadamard transform before rounding:"
                          f" {', '.join(ROTATIONS)} (hadamard: every quantized choice; both: each choice both ways,"
                          f" the solver picks per layer). [default: {DEFAULT_ROTATION}]"),
    ] = None  # fmt: skip
    sequential: Annotated[
        bool,
        typer.Option("--sequential/--no-sequential",
                     help="GPTQ rounding: calibrate each block on the quantized blocks before it, as published (apply,"
                          " export and evaluate; the profile scores FP inputs). With the Hadamard rotation it measured"
                          " even, at three times the time to apply."),
    ] = False  # fmt: skip
    max_memory: Annotated[
        str | None,
        typer.Option(
            metavar="SIZE",
            help="Memory the profile may use, model included (e.g. 4GB). The fisher profiler streams the model"
            " block by block (a causal LM from a .gguf file or a safetensors folder is also read from it block by"
            " block) and builds error stacks in row chunks that fit; a bound too small for one block is"
            " refused, naming the smallest that works. [default: 80% of this machine's memory]",
        ),
    ] = None

    ray: Annotated[
        str | None,
        typer.Option(
            metavar="ADDRESS",
            help="Score the model's blocks on a Ray cluster (fisher profiler): `local` (started here, one worker"
            " per CPU), `local:N` (N workers), or a running cluster's address (HOST:PORT, auto). The driver runs the"
            " passes, workers read their block's weights from the model file; the scores equal one process's."
            " Needs pip install 'allocator[distributed]'.",
        ),
    ] = None

    def choices(self) -> tuple[list[Choice], dict[str, int]]:
        """The whole-term choices to profile, and the fraction limits that go with them (every
        option checked, so a bad one is refused before any model is loaded)."""
        if self.profiler not in PROFILER_NAMES:
            raise AllocatorError(f"unknown profiler {self.profiler!r}; choose one of {', '.join(PROFILER_NAMES)}")
        if self.method is not None and self.method not in METHODS:
            raise AllocatorError(f"unknown --method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.rotation is not None and self.rotation not in ROTATIONS:
            raise AllocatorError(f"unknown --rotation {self.rotation!r}; choose one of {', '.join(ROTATIONS)}")
        if self.max_memory is not None:
            parse_size(self.max_memory)  # refused here, before any model is loaded
        if self.ray is not None and self.profiler != "fisher":
            raise AllocatorError(f"--ray fans out the fisher profiler's scoring; --profiler {self.profiler} runs in"
                                 " one process: drop --ray")  # fmt: skip
        if self.format not in FORMATS:
            raise AllocatorError(f"unknown --format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.format == "gguf":
            return self._gguf_choices(), {}
        if self.types is not None:
            raise AllocatorError("--types names GGUF block types; add --format gguf")
        kinds = [k.strip() for k in self.kinds.split(",") if k.strip()] if self.kinds else None
        for k in kinds or []:
            if k not in KINDS:
                raise AllocatorError(f"--kinds takes {', '.join(KINDS)}, got {k!r}")
        groups = _parse_groups(self.group_size)
        if self.device_bits is None:
            bits = _parse_ints(self.bits, "bits", QUANT_BITS) if self.bits else list(DEFAULT_BITS)
            terms = _parse_ints(self.terms, "terms", _TERMS) if self.terms else list(DEFAULT_TERMS)
            return choice_grid(bits, terms, groups, kinds=kinds or DEFAULT_KINDS), {}
        device = self.device_bits
        bits = _parse_ints(self.bits, "bits", QUANT_BITS) if self.bits else [b for b in DEFAULT_BITS if b <= device]
        if any(b > device for b in bits):
            raise AllocatorError(f"--bits {self.bits} has widths above --device-bits {device}")
        terms = _parse_ints(self.terms, "terms", _TERMS) if self.terms else list(_TERMS)
        limit = device * max(terms)
        grid = choice_grid(bits, terms, groups, kinds=kinds or ["residual", "tied"], max_bits=limit)
        return grid, {"fraction_terms": max(terms), "fraction_bits": limit}


    def _gguf_choices(self) -> list[Choice]:
        """fp16 and the GGUF block types asked for (all by default); the native grid's options refused."""
        native = {"--bits": self.bits, "--terms": self.terms, "--kinds": self.kinds, "--device-bits": self.device_bits,
                  "--rotation": self.rotation if self.rotation not in (None, "none") else None,
                  "--group-size": None if self.group_size == _groups_text(DEFAULT_GROUP_SIZES) else self.group_size}
        given = [k for k, v in native.items() if v is not None]
        if given:
            raise AllocatorError(
                f"{given[0]} describes allocator's own format; a GGUF plan (--format gguf) picks among block types:"
                " use --types (e.g. --types q4_k,q4_0,q8_0)"
            )
        names = [t.strip().lower() for t in self.types.split(",") if t.strip()] if self.types else None
        if names == ["all"]:
            return ggml_grid(names)
        for n in names or []:
            if n not in GGML_TYPES:
                raise AllocatorError(f"--types takes all or some of {', '.join(GGML_TYPES)}, got {n!r}")
            if not GGML_TYPES[n].available:
                raise AllocatorError(
                    f"--types {n}: the installed gguf package cannot write {GGML_TYPES[n].gguf}; install the gguf-py"
                    " of a llama.cpp that has it (pip install <llama.cpp>/gguf-py) or leave it out"
                )
        if names == []:
            raise AllocatorError("--types is empty")
        return ggml_grid(names)


_TERMS = tuple(range(1, MAX_TERMS + 1))


def _parse_ints(text: str, what: str, allowed: tuple[int, ...]) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AllocatorError(f"--{what} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise AllocatorError(f"--{what} is empty")
    bad = [v for v in values if v not in allowed]
    if bad:
        raise AllocatorError(f"--{what} takes values from {min(allowed)} to {max(allowed)}, got {bad[0]}")
    return values


def _parse_groups(text: str) -> list[int | None]:
    out: list[int | None] = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        if part in ("channel", "ch", "row"):
            out.append(None)
        elif part.isdigit() and 0 < int(part) <= 1 << 20:
            out.append(int(part))
        else:
            raise AllocatorError(f"--group-size takes positive integers (at most 1048576) or 'channel', got {part!r}")
    if not out:
        raise AllocatorError("--group-size is empty")
    return out


@dataclasses.dataclass
class SolverOptions:
    """How the allocation problem is solved."""

    solver: Annotated[str, typer.Option(help=f"Solver backend: {', '.join(SOLVERS)}.")] = "auto"
    gap: Annotated[float, typer.Option(min=0.0, max=1.0, help="Relative optimality gap accepted as optimal.")] = 1e-6
    time_limit: Annotated[
        float, typer.Option(min=0.001, help="Seconds for exact work (CP-SAT, HiGHS).")
    ] = 10.0


F = TypeVar("F", bound=Callable[..., Any])


def with_options(command: F) -> F:
    """Spread every parameter of `command` annotated with an options dataclass into that
    dataclass's fields (as CLI options), and hand `command` the filled-in dataclass."""
    hints = typing.get_type_hints(command, include_extras=True)
    signature = inspect.signature(command)
    groups: dict[str, type] = {}
    params: list[inspect.Parameter] = []
    for name, param in signature.parameters.items():
        hint = hints.get(name, param.annotation)
        if dataclasses.is_dataclass(hint):
            groups[name] = hint  # type: ignore[assignment]
            for field in dataclasses.fields(hint):
                field_hint = typing.get_type_hints(hint, include_extras=True)[field.name]
                params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=field.default,
                                                annotation=field_hint))  # fmt: skip
        else:
            params.append(param.replace(annotation=hint, kind=inspect.Parameter.KEYWORD_ONLY))

    @functools.wraps(command)
    def run(**kwargs: Any) -> Any:
        for name, cls in groups.items():
            kwargs[name] = cls(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(cls)})
        return command(**kwargs)

    run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    return run  # type: ignore[return-value]
