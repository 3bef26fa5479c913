"""End-to-end tuning (`--tune`): it moves scales and offsets only, lowers the output divergence it
is tuned on, stays exactly what the packed file stores, and refuses what it cannot do in one line."""

import copy

import pytest
import torch

from allocator.errors import PlanError
from allocator.quantized.apply import apply_plan_, quantize_layers_
from tests.allocator.quantized.llama_cases import assert_packed_file_reproduces, every_kind, kl, planned_llama


@pytest.fixture(scope="module")
def llama_plan():
    """The planned random Llama, with 32 steps of end-to-end tuning."""
    model, data, task, plan = planned_llama(tune_steps=32)
    assert plan.tune_steps == 32 and plan.refine_steps == 0
    return model, data, task, plan


@pytest.mark.parametrize("kind", ["plan", "mixed"])
def test_tuning_lowers_the_divergence_it_is_tuned_on_and_moves_scales_only(llama_plan, kind):
    """`mixed`: every term kind at once (a fractional choice, two residual terms, tied terms,
    symmetric, per channel, unrotated, fp16); tied terms have no scale of their own to tune."""
    model, data, task, plan = llama_plan
    choices = {name: lp.choice for name, lp in plan.layers.items()}
    rows = None
    if kind == "mixed":
        choices, rows = every_kind(plan)
    tuned_model, bare = copy.deepcopy(model), copy.deepcopy(model)
    made = quantize_layers_(tuned_model, choices, extra_rows=rows, method="gptq-act", calibration=data, task=task,
                            tune_steps=32)  # fmt: skip
    rounded = quantize_layers_(bare, choices, extra_rows=rows, method="gptq-act", calibration=data, task=task)
    tuning = made.tuned
    assert tuning is not None and tuning.kept and tuning.loss_after < tuning.loss_before
    # Only the tuned terms learned: the model's own weights took no gradient and keep their flags.
    assert all(p.grad is None and p.requires_grad for p in tuned_model.parameters())
    tunable = [c for c in choices.values() if c.quantized and c.kind == "residual"]
    assert tuning.layers == len(tunable) and tuning.parameters > 0
    # Its losses are the mean KL per sample over the calibration batches, before and after.
    samples = sum(b["input_ids"].shape[0] for b in data)
    assert tuning.loss_after == pytest.approx(kl(model, tuned_model, data, task) / samples, rel=1e-4)
    assert tuning.loss_before == pytest.approx(kl(model, bare, data, task) / samples, rel=1e-4)
    modules = dict(tuned_model.named_modules())
    moved = 0
    for name, layer in made.layers.items():
        assert torch.equal(modules[name].weight, layer.weight().to(torch.float32)), name  # the model is what is stored
        before = rounded.layers[name]
        for new, old in zip(layer.terms + (layer.extra or []), before.terms + (before.extra or []), strict=True):
            assert torch.equal(new.codes, old.codes), name  # the codes stay as rounded
            moved += int(not torch.equal(new.scale, old.scale))
            if choices[name].kind == "tied":
                assert torch.equal(new.scale, old.scale), name
    assert moved > 0


def test_the_packed_file_reproduces_the_tuned_model_to_the_bit(llama_plan, tmp_path):
    model, data, task, plan = llama_plan
    assert_packed_file_reproduces(model, data, task, plan, tmp_path / "tuned.safetensors")


def test_tuning_without_calibration_data_is_refused_and_the_model_left_unchanged(llama_plan):
    model, _, task, plan = llama_plan
    target = copy.deepcopy(model)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    rtn = plan.model_copy(update={"method": "rtn"})  # needs no calibration for its rounding
    with pytest.raises(PlanError, match=r"end-to-end tuning \(--tune\).*calibration"):
        apply_plan_(target, rtn, task=task)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
