"""What the tests of the steps after the rounding (`--refine`, `--tune`) share: a planned random
Llama, the KL of a model from its reference, every term kind at once, and the packed-file check."""

import copy

import torch

import allocator
from allocator.quantized.apply import apply_plan_
from allocator.quantized.export import export_quantized
from allocator.quantized.load import load_quantized
from profilers.quant.options import with_rotation
from tests.profilers.test_streaming import batches, tiny_llama


def planned_llama(**after: int):
    """A 3-block random Llama planned at 3 bpw (GPTQ in activation order, Hadamard-rotated
    choices), with `after` (`refine_steps`, `tune_steps`) recorded in the plan."""
    model, data = tiny_llama(layers=3, tied=False), batches(n=4)
    task = allocator.LogitsTask(causal=True)
    grid = with_rotation(allocator.choice_grid((2, 3, 4), (1, 2), (32, None)), "hadamard")
    plan = allocator.solve(model, data, task=task, budget="3bpw", choices=grid, method="gptq-act", fractions=4,
                           exclude=["lm_head", "model.embed_tokens"], **after)  # fmt: skip
    return model, data, task, plan


def kl(reference, model, data, task) -> float:
    """The summed KL of `model`'s outputs from `reference`'s over `data`."""
    with torch.no_grad():
        return float(sum(task.divergence(task.forward(reference, b), task.forward(model, b), b).sum() for b in data))


def every_kind(plan):
    """Every term kind at once over the plan's layers (a fractional choice, two residual terms,
    tied terms, symmetric, per channel, unrotated, fp16), and the rows of the fractional ones."""
    kinds = [allocator.Choice.parse(label) for label in ("int2+1/4-ch-had", "int2x2-g32", "fp16", "int3-ch",
                                                         "int2x2t-g32", "int4-g32-had")]  # fmt: skip
    kinds.append(allocator.Choice(bits=3, group_size=32, symmetric=True))
    choices = {name: kinds[i % len(kinds)] for i, name in enumerate(plan.layers)}
    rows = {name: torch.arange(0, plan.layers[name].shape[0], 4).numpy() for name, c in choices.items() if c.extra}
    return choices, rows


def assert_packed_file_reproduces(model, data, task, plan, path) -> None:
    """Exported from scratch, the plan's file loads back as the applier's model, to the bit; the
    FP model is left as it was."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fake = apply_plan_(copy.deepcopy(model), plan, calibration=data, task=task)
    loaded = load_quantized(export_quantized(model, plan, path, calibration=data, task=task),
                            model=tiny_llama(layers=3, tied=False), kernels=False)  # fmt: skip
    with torch.no_grad():
        for batch in data:
            assert torch.equal(task.forward(loaded, batch), task.forward(fake, batch))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
