"""Python API: `profile`, `solve`, `apply_plan_`, `compare`.

Example:
    >>> import allocator, torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 10))
    >>> data = [torch.randn(16, 64) for _ in range(4)]
    >>> plan = allocator.solve(model, data, budget="4bpw")
    >>> plan.solver.status, plan.predicted.bpw <= 4
    ('optimal', True)
    >>> _ = allocator.apply_plan_(model, plan, calibration=data)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from profilers.estimators import DEFAULT_PROFILER
from profilers.estimators.base import ProgressFn
from profilers.estimators.registry import make_profiler
from profilers.layers import find_targets
from profilers.quant.options import DEFAULT_FRACTIONS, DEFAULT_METHOD, FORMATS, choice_grid, ggml_grid, needs_hessian
from profilers.tasks import Task, infer_task
from profilers.types import Choice, ProfileTable

from .errors import AllocatorError
from .planning.budget import Budget, parse_size
from .planning.build import plan_from_profile
from .planning.plan import Plan
from .planning.ties import check_tie_specs, profiled_ties
from .progress import terminal_progress
from .quantized.export import header_allowance

__all__ = ["profile", "solve"]


def profile(
    model: nn.Module,
    data: Iterable[Any],
    *,
    task: Task | None = None,
    profiler: str = DEFAULT_PROFILER,
    choices: Sequence[Choice] | None = None,
    fractions: int = DEFAULT_FRACTIONS,
    fraction_terms: int = 2,
    fraction_bits: int = 8,
    method: str = DEFAULT_METHOD,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    draws: int | None = None,
    seed: int = 0,
    act_bits: int = 16,
    model_name: str = "",
    progress: ProgressFn | None = None,
    max_memory: int | str | None = None,
    sequential: bool = False,
    scored: int | None = None,
    target_format: str = "native",
    gguf_source: str | os.PathLike[str] | None = None,
    ray: str | None = None,
) -> ProfileTable:
    """Measure, once, the cost and estimated sensitivity of every (layer, choice).

    Args:
        model: the FP model (not modified).
        data: calibration batches: dicts of tensors (passed as keyword arguments), tuples
            `(inputs, ...)`, or input tensors.
        task: what the output is (`EmbeddingTask`, `LogitsTask`); inferred when None.
        profiler: `fisher` (default), `hessian` or `measured`.
        choices: whole-term options per layer; default `choice_grid()`.
        fractions: options where k/fractions of a layer's rows carry one more term
            (0 or 1: none).
        fraction_terms, fraction_bits: fractions only where the next term stays within this
            many terms and bits per weight.
        method: rounding the applier will use (`rtn`, `gptq`); choices are scored with its errors.
        include, exclude: fnmatch patterns of layer names.
        draws: pseudo-label draws per batch (fisher, hessian); None: the profiler's default.
        seed: seed of the draws.
        act_bits: activation bits for BOPs.
        model_name: recorded in the profile.
        progress: optional `(stage, done, total)` callback; None: progress bars on stderr
            when it is a terminal.
        max_memory: memory the profile may use, model included (`"4GB"` or bytes; fisher):
            error stacks are built in row chunks that fit, and a bound too small for one block
            is refused naming the smallest that works. None: 80% of this machine's memory.
        sequential: record that the applier calibrates GPTQ sequentially (each block on the
            quantized blocks before it, as published); the scores stay those of FP inputs.
        scored: score sensitivities on this many of the batches, evenly spaced (None: all);
            GPTQ's `H` reads them all, as the applier's does.
        target_format: what the plan will be written as: `native` (allocator's packed file) or
            `gguf` (llama.cpp block types; default choices `ggml_grid()`, each layer offered the
            types its rows can take, and the bytes those of the GGUF file written from `gguf_source`).
        gguf_source: the GGUF file `model` was read from (`target_format="gguf"`).
        ray: score the model's blocks on a Ray cluster (fisher; `pip install 'allocator[distributed]'`):
            `local` (started here, one worker per CPU), `local:N`, or a running cluster's address
            (`auto`, `HOST:PORT`). The table is the same as in one process. None: this process only.
    """
    choices = _format_choices(target_format, choices, gguf_source)
    limit = None if max_memory is None else parse_size(max_memory)
    if ray is not None and profiler != "fisher":
        raise AllocatorError(f"ray fans out the fisher profiler's scoring; the {profiler} profiler runs in one process")
    with terminal_progress(progress) as update:
        table = make_profiler(profiler, draws=draws, seed=seed, max_memory=limit, ray=ray).profile(
            model,
            data,
            choices=choices,
            task=task,
            fractions=fractions,
            fraction_terms=fraction_terms,
            fraction_bits=fraction_bits,
            method=method,
            include=include,
            exclude=exclude,
            act_bits=act_bits,
            model_name=model_name,
            progress=update,
            scored=scored,
        )
    settings = {**table.settings, "sequential": sequential and needs_hessian(method)}
    if target_format == "gguf":  # the bytes of the GGUF file: its header, the tensors copied from the source
        from .quantized.gguf_export import GgufSource

        return GgufSource(gguf_source, model).priced(table.model_copy(update={"settings": settings}))  # type: ignore[arg-type]
    # Reserve the packed file's header, so a byte budget holds for the file on disk.
    return table.model_copy(update={"file_overhead": header_allowance(model, table), "settings": settings})


def _format_choices(
    target_format: str, choices: Sequence[Choice] | None, gguf_source: str | os.PathLike[str] | None
) -> list[Choice]:
    """The choices to profile for a format (its default grid when None), refused when the format cannot hold them."""
    if target_format not in FORMATS:
        raise AllocatorError(f"unknown format {target_format!r}; choose one of {', '.join(FORMATS)}")
    if target_format == "native":
        return list(choices) if choices is not None else choice_grid()
    if gguf_source is None:
        raise AllocatorError(
            "a GGUF plan is written from the GGUF file the model was read from; load the model from a .gguf file"
            " (from a Hugging Face folder: convert it with llama.cpp's convert_hf_to_gguf.py --outtype f16 first)"
        )
    if choices is not None and any(c.quantized and c.ggml is None for c in choices):
        raise AllocatorError("a GGUF plan takes llama.cpp block types and fp16 only (e.g. ggml_grid())")
    return list(choices) if choices is not None else ggml_grid()


def solve(
    model_or_profile: nn.Module | ProfileTable,
    data: Iterable[Any] | None = None,
    *,
    budget: str | Budget | Sequence[str | Budget],
    ties: Sequence[str | Sequence[str]] = (),
    solver: str = "auto",
    gap: float = 1e-6,
    time_limit: float = 10.0,
    task: Task | None = None,
    refine_steps: int = 0,
    tune_steps: int = 0,
    **profile_options: Any,
) -> Plan:
    """Plan the bits and terms of every layer for the most quality within `budget`.

    Args:
        model_or_profile: the FP model (profiled first, with `data`) or a `ProfileTable`.
        data: calibration batches (needed with a model).
        budget: `"12MB"`, `"300MiB"`, `"3.5bpw"`, `"25%"`, `"40GBOPs"`, or several.
        ties: groups of layers that must share a choice: presets (`"qkv"`, `"gate_up"`) or
            fnmatch patterns (needs the model, to build the layer graph).
        solver: solver backend: `auto`, `greedy`, `cpsat`, `milp`, `lp`, `exhaustive`.
        gap: relative optimality gap `auto` accepts without an exact solve.
        time_limit: seconds for an exact solve.
        task: the model's output kind; inferred when None.
        refine_steps: block reconstruction steps per block the applier runs after the rounding
            (`allocator.quantized.refine`; 0: none), recorded in the plan.
        tune_steps: end-to-end tuning steps of the scales the applier runs after that
            (`allocator.quantized.tune`; 0: none), recorded in the plan.
        **profile_options: passed to `profile` (method, choices, include, exclude, draws, ...).

    Returns:
        The `Plan`: per-layer choice, predicted bytes/BOPs/loss, solver status and gap, and
        every uniform setting priced on the same profile.
    """
    for name, steps in (("refine_steps", refine_steps), ("tune_steps", tune_steps)):
        if steps < 0:
            raise AllocatorError(f"{name} must be 0 (none) or more, got {steps}")
    check_tie_specs(ties)
    budgets = [budget] if isinstance(budget, (str, Budget)) else list(budget)
    tie_names: list[list[str]] = []
    if isinstance(model_or_profile, ProfileTable):
        if profile_options:
            raise AllocatorError(f"profile options {sorted(profile_options)} need a model, not a profile")
        table = model_or_profile
        if ties:
            tie_names = [list(t) for t in ties if not isinstance(t, str)]
            if len(tie_names) != len(ties):
                raise AllocatorError("tie presets need the model (to build its layer graph); pass layer-name lists")
    else:
        if data is None:
            raise AllocatorError("solving from a model needs calibration data: solve(model, data, budget=...)")
        batches = list(data)
        if not batches:
            raise AllocatorError("the calibration data is empty; pass at least one batch")
        task = task or infer_task(model_or_profile, batches[0])
        table = profile(model_or_profile, batches, task=task, **profile_options)
        if ties:
            targets = find_targets(
                model_or_profile,
                include=profile_options.get("include", ("*",)),
                exclude=profile_options.get("exclude", ()),
            )
            tie_names = profiled_ties(model_or_profile, targets, batches[0], task, table.names, ties)
    plan = plan_from_profile(table, budgets, ties=tie_names, solver=solver, gap=gap, time_limit=time_limit)
    if refine_steps or tune_steps:
        plan = plan.model_copy(update={"refine_steps": refine_steps, "tune_steps": tune_steps})
    return plan
