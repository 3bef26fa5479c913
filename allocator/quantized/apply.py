"""Apply a plan to a torch model: every planned weight replaced by its quantized reconstruction.

This is fake quantization (weights stay float tensors holding exactly the values the packed
format reproduces). Everything the plan keeps in floating point is rounded to fp16, as it
would be stored, so measured quality is the quality of the model the plan describes.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from profilers.blocks import Chain, NotAChain, find_blocks
from profilers.cluster import Cluster
from profilers.input_hessians import BlockRecord, block_hessians, input_hessians, streamed_hessians
from profilers.layers import find_targets
from profilers.quant.options import needs_hessian
from profilers.resident import held, is_lazy, state_with_owners
from profilers.tasks import Task, infer_task
from profilers.types import Choice

from ..errors import PlanError
from ..planning.plan import Plan
from .checks import check_plan_fits_model, check_profile_fits_model, checked_layers
from .distributed import submit_rounding
from .refine import BlockRefinement, record_chain, refine_blocks_
from .stored import StoredLayer, stored_layer
from .tune import Tuning, tune_model_

__all__ = [
    "Quantized",
    "apply_choices_",
    "apply_plan_",
    "check_plan_fits_model",
    "check_profile_fits_model",
    "hessian_groups",
    "layer_hessians",
    "plan_hessians",
    "quantize_layers_",
    "quantize_plan_",
]


@dataclass
class Quantized:
    """What quantizing a model stored per planned layer, each block's reconstruction (empty
    without `refine_steps`) and the end-to-end tuning (None without `tune_steps`)."""

    layers: dict[str, StoredLayer]
    refined: list[BlockRefinement] = field(default_factory=list)
    tuned: Tuning | None = None


def layer_hessians(model: nn.Module, batches: Sequence[Any], task: Task) -> dict[str, Tensor]:
    """Every quantizable layer's input second moment `H` (what GPTQ needs), by layer name."""
    targets = find_targets(model)
    found = input_hessians(model, batches, task, targets)
    return {targets[i].spec.name: h for i, h in found.items()}


def apply_choices_(model: nn.Module, choices: dict[str, Choice], **options: Any) -> nn.Module:
    """`quantize_layers_` (its keyword options), returning the quantized model."""
    quantize_layers_(model, choices, **options)
    return model


def quantize_layers_(
    model: nn.Module,
    choices: dict[str, Choice],
    *,
    extra_rows: dict[str, np.ndarray] | None = None,
    method: str = "rtn",
    hessians: dict[str, Tensor] | None = None,
    calibration: Sequence[Any] | None = None,
    task: Task | None = None,
    sequential: bool = False,
    refine_steps: int = 0,
    tune_steps: int = 0,
    round_rest_to_fp16: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
    ray: str | None = None,
) -> Quantized:
    """Quantize the named layers' weights in place with the given choices; what each stores.

    Validates every name and weight (and that a reconstruction can run) before changing
    anything, so a refused input leaves the model as it was.

    Args:
        model: the model to change.
        choices: layer name -> choice.
        extra_rows: layer name -> rows carrying the extra term, for fractional choices.
        method: `rtn`, `gptq` or `gptq-act` (GPTQ where the layer has an `H`).
        hessians: layer name -> `H` (`layer_hessians`), or
        calibration, task: the batches to take each `H` from, block by block (`hessian_groups`).
        sequential: from calibration, each block's `H` comes from the outputs of the blocks
            already quantized (GPTQ's sequential calibration), not from the FP model.
        refine_steps: then tune each block's stored terms for this many steps on `calibration`
            to reproduce the FP block outputs (`refine.refine_blocks_`); 0: no reconstruction.
        tune_steps: then tune every layer's scales and offsets together for this many steps on
            `calibration`, on the task's divergence of the model's output from the FP model's
            (`tune.tune_model_`); 0: no end-to-end tuning.
        round_rest_to_fp16: round every other floating-point parameter and buffer to fp16
            precision (how the plan stores them; `quantize_plan_` decides by the plan's format).
        progress: `(stage, done, total)` callback.
        ray: round the blocks of a GPTQ model on a Ray cluster (`distributed`: `local`,
            `local:N` or an address `ray.init` takes), each block's `H` taken there from its
            recorded inputs; what each layer stores is the same as in one process. A sequential
            calibration stays in this process.

    Raises:
        PlanError: an unknown layer name, a weight with NaN/inf values, a reconstruction
            asked for without calibration batches or on a model without a chain of blocks, a
            tuning asked for without calibration batches, or either asked for llama.cpp block types.
    """
    modules, weights = checked_layers(model, choices, extra_rows)
    blocks = [name for name, c in choices.items() if c.ggml is not None]
    if blocks and (refine_steps or tune_steps):
        raise PlanError(
            f"block reconstruction and end-to-end tuning (--refine, --tune) tune allocator's own scales, and"
            f" {blocks[0]!r} takes a llama.cpp block type ({choices[blocks[0]].label}); plan GGUF types without them"
        )
    chain = reference = None
    if tune_steps:
        batches = _calibration(calibration, "end-to-end tuning (--tune) matches the FP model's output on")
        task = task or infer_task(model, batches[0])
        reference = copy.deepcopy(model)  # the FP model, whose outputs the tuning matches
    if refine_steps:
        batches = _calibration(calibration, "block reconstruction (--refine) tunes each block on")
        task = task or infer_task(model, batches[0])
        chain = _fp_chain(model, batches, task)
    with torch.no_grad():
        stored = _round_layers(model, modules, weights, choices, extra_rows, method, hessians, calibration, task,
                               sequential, ray, progress)  # fmt: skip
        if round_rest_to_fp16:
            _round_rest_to_fp16(model, weights)
    refined = []
    if chain is not None:
        assert calibration is not None and task is not None
        refined = refine_blocks_(model, chain, stored, list(calibration), task, refine_steps, progress=progress)
        del chain
    tuning = None
    if reference is not None:
        assert calibration is not None and task is not None
        tuning = tune_model_(model, reference, stored, list(calibration), task, tune_steps, progress=progress)
    return Quantized(stored, refined, tuning)


def _round_layers(
    model: nn.Module,
    modules: dict[str, nn.Module],
    weights: dict[str, nn.Parameter],
    choices: dict[str, Choice],
    extra_rows: dict[str, np.ndarray] | None,
    method: str,
    hessians: dict[str, Tensor] | None,
    calibration: Sequence[Any] | None,
    task: Task | None,
    sequential: bool,
    ray: str | None,
    progress: Callable[[str, int, int], None] | None,
) -> dict[str, StoredLayer]:
    """Every named layer rounded (on a Ray cluster where `ray` names one: the blocks of a
    non-sequential GPTQ plan) and its reconstruction written into its weight; what each stores."""
    ship = ray is not None and needs_hessian(method) and hessians is None and not sequential
    if ray is not None and not ship:
        why = ("a sequential plan calibrates each block on the quantized blocks before it" if sequential else
               "rounding to nearest needs no H" if not needs_hessian(method) else "the H were given")
        warnings.warn(f"--ray: {why}; the layers are rounded in this process", stacklevel=3)
    cluster = Cluster(ray, progress or (lambda *_: None), "blocks rounded", torch.get_num_threads()) if ship else None
    stored: dict[str, StoredLayer] = {}
    order: list[str] = []  # the layers in the order their groups came (the order they are stored in)
    try:
        groups = hessian_groups(model, list(choices), method, hessians, calibration, task, sequential=sequential,
                                ship=cluster is not None)  # fmt: skip
        batches = None
        for names, group in groups:
            order += names
            if isinstance(group, BlockRecord):
                assert cluster is not None and calibration is not None
                batches = batches or cluster.put(list(calibration))
                submit_rounding(cluster, group, names, choices, extra_rows, method, batches)
                continue
            for name in names:
                with held(modules[name]):  # in its block's group already, unless no input reached it
                    h = group.get(name)
                    rows = (extra_rows or {}).get(name)
                    stored[name] = stored_layer(weights[name], choices[name], rows, method, h)
                    weights[name].copy_(stored[name].weight())
        for done in cluster.gather() if cluster is not None else []:
            for name, layer in done.items():
                stored[name] = layer
                if not is_lazy(modules[name]):  # a block read on use is dropped anyway: not read again for this
                    weights[name].copy_(layer.weight())
    finally:
        if cluster is not None:
            cluster.close()
    return {name: stored[name] for name in order}


def _fp_chain(model: nn.Module, batches: Sequence[Any], task: Task) -> Chain:
    """The FP model's block inputs and outputs on `batches`, before any weight changes."""
    blocks = find_blocks(model, find_targets(model))
    try:
        if not blocks:
            raise NotAChain("no repeated blocks")
        return record_chain(model, batches, task, blocks)
    except NotAChain as e:
        raise PlanError(
            f"block reconstruction (--refine) needs a model made of a chain of repeated blocks ({e});"
            " use --refine 0 for this model"
        ) from None


def _round_rest_to_fp16(model: nn.Module, planned: dict[str, nn.Parameter]) -> None:
    """Round what the packed file stores in fp16: the state dict's other floating tensors.
    Non-persistent buffers (e.g. rotary frequencies) are not stored, so they stay as they are;
    nor do blocks read on use (read again, they hold the file's values; the export rounds them)."""
    done = {id(w) for w in planned.values()}
    for _, t, owner in state_with_owners(model):
        if id(t) in done or not t.is_floating_point() or is_lazy(owner):
            continue
        done.add(id(t))
        t.copy_(t.half().to(t.dtype))


def apply_plan_(
    model: nn.Module,
    plan: Plan,
    *,
    hessians: dict[str, Tensor] | None = None,
    calibration: Sequence[Any] | None = None,
    task: Task | None = None,
    round_rest_to_fp16: bool | None = None,
) -> nn.Module:
    """Quantize `model` in place as `plan` says and return it.

    A plan scored for GPTQ (`plan.method` `gptq` or `gptq-act`) needs every layer's `H`: pass
    the `calibration` batches it was profiled with (and its `task`, else inferred), or `hessians`
    (`layer_hessians`). From calibration, the model is quantized block by block, holding one
    block's `H` at a time (`hessian_groups`), each block calibrated on the quantized blocks
    before it when `plan.sequential`.

    Raises:
        PlanError: the plan names layers the model lacks, a weight's shape differs from the one
            the plan was made for, or a GPTQ plan comes without calibration data.

    Example:
        >>> plan = Plan.load("plan.json")  # doctest: +SKIP
        >>> apply_plan_(model, plan)  # doctest: +SKIP
    """
    quantize_plan_(model, plan, hessians=hessians, calibration=calibration, task=task,
                   round_rest_to_fp16=round_rest_to_fp16)  # fmt: skip
    return model


def quantize_plan_(
    model: nn.Module,
    plan: Plan,
    *,
    hessians: dict[str, Tensor] | None = None,
    calibration: Sequence[Any] | None = None,
    task: Task | None = None,
    round_rest_to_fp16: bool | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    ray: str | None = None,
) -> Quantized:
    """`apply_plan_`, returning what each planned layer stores (`export_quantized` packs it), and
    the reports of the block reconstruction and the end-to-end tuning when the plan asks for
    them (`plan.refine_steps`, `plan.tune_steps`).

    `round_rest_to_fp16` None: as the plan's file stores the other tensors (allocator's packed
    file: in fp16; a GGUF file: as its source, so they keep the values they were read as).
    `ray`: the blocks rounded on a Ray cluster (`quantize_layers_`)."""
    check_plan_fits_model(model, plan)
    if round_rest_to_fp16 is None:
        round_rest_to_fp16 = plan.target_format == "native"
    choices = {name: lp.choice for name, lp in plan.layers.items()}
    rows = {name: lp.rows_with_extra_term() for name, lp in plan.layers.items() if lp.choice.extra}
    return quantize_layers_(model, choices, extra_rows=rows, method=plan.method, hessians=hessians,
                            calibration=calibration, task=task, sequential=plan.sequential,
                            refine_steps=plan.refine_steps, tune_steps=plan.tune_steps,
                            round_rest_to_fp16=round_rest_to_fp16,
                            progress=progress, ray=ray)  # fmt: skip


def hessian_groups(
    model: nn.Module,
    names: Sequence[str],
    method: str,
    hessians: dict[str, Tensor] | None,
    calibration: Sequence[Any] | None,
    task: Task | None,
    *,
    sequential: bool = False,
    ship: bool = False,
) -> Iterator[tuple[list[str], dict[str, Tensor] | BlockRecord]]:
    """The named layers in groups, each with the `H` its rounding needs (none for RTN), every
    layer in exactly one group. Given `hessians`, one group. From calibration data the groups
    are the model's blocks (`streamed_hessians`: one block's `H` held at a time); layers no
    input reaches come last, without `H` (rounded to nearest).

    With `sequential`, the caller must write each group's quantized weights into `model`
    before asking for the next: the next `H` is taken on the model as it then is. With `ship`
    (from calibration, not sequential), a block's group comes with its `BlockRecord` instead of
    its `H`, for the layers to be rounded elsewhere.
    """
    names = list(names)
    if not needs_hessian(method) or hessians is not None:
        wanted = set(names)
        yield names, {n: h for n, h in (hessians or {}).items() if n in wanted}
        return
    batches = _calibration(calibration)
    targets = find_targets(model)
    index = {t.spec.name: i for i, t in enumerate(targets)}
    left = set(names)
    task = task or infer_task(model, batches[0])
    for group in streamed_hessians(model, batches, task, targets, sequential=sequential, ship=ship):
        if isinstance(group, BlockRecord):
            mine = [n for n in names if n in left and index[n] in group.targets]
            left -= set(mine)
            if any(len(targets[index[n]].modules) > 1 for n in mine):  # a weight several modules use: its H here
                with held(group.block):
                    sums = block_hessians(group.block, group.calls, group.inputs.__getitem__, batches, targets)
                yield mine, {n: sums[index[n]].float() for n in mine if index[n] in sums}
            elif mine:
                yield mine, group
            continue
        by_name = {targets[i].spec.name: h for i, h in group.items()}
        mine = [n for n in names if n in left and n in by_name]
        left -= set(mine)
        yield mine, {n: by_name[n] for n in mine}
        del group, by_name
    yield [n for n in names if n in left], {}


def _calibration(calibration: Sequence[Any] | None, need: str = "") -> list[Any]:
    if not calibration:
        if need:
            raise PlanError(f"{need} calibration data: pass the batches the plan was profiled with (calibration=...)")
        raise PlanError(
            "this plan was scored for GPTQ rounding: pass the calibration batches it was profiled with"
            " (apply_plan_(model, plan, calibration=batches)) or hessians=layer_hessians(...)"
        )
    return list(calibration)


def plan_hessians(
    model: nn.Module,
    plan: Plan,
    hessians: dict[str, Tensor] | None,
    calibration: Sequence[Any] | None,
    task: Task | None,
) -> dict[str, Tensor] | None:
    """The `H` a plan's rounding needs: none for RTN; given, or computed from calibration, for GPTQ."""
    if not needs_hessian(plan.method) or hessians is not None:
        return hessians
    batches = _calibration(calibration)
    return layer_hessians(model, batches, task or infer_task(model, batches[0]))
