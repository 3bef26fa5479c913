"""Block reconstruction (`--refine`): what it tunes stays exactly what the packed file stores,
it lowers the error it is tuned on, and it refuses what it cannot do in one line."""

import copy

import pytest
import torch
from torch import nn

import allocator
from allocator.errors import PlanError
from allocator.quantized.apply import apply_plan_, quantize_layers_
from allocator.quantized.tuned import TunedLayer
from tests.allocator.quantized.llama_cases import assert_packed_file_reproduces, every_kind, kl, planned_llama


@pytest.fixture(scope="module")
def llama_plan():
    """The planned random Llama, with 64 reconstruction steps per block."""
    model, data, task, plan = planned_llama(refine_steps=64)
    assert plan.refine_steps == 64
    return model, data, task, plan


@pytest.mark.parametrize("kind", ["plan", "mixed"])
def test_reconstruction_lowers_each_kept_block_error_and_the_model_error_it_was_tuned_on(llama_plan, kind):
    """`plan`: the solved plan; `mixed`: every term kind the tuning handles at once (a
    fractional choice, two terms, tied terms, symmetric, per channel, unrotated, fp16)."""
    model, data, task, plan = llama_plan
    choices = {name: lp.choice for name, lp in plan.layers.items()}
    rows = None
    if kind == "mixed":
        choices, rows = every_kind(plan)
    refined_model = copy.deepcopy(model)
    made = quantize_layers_(refined_model, choices, extra_rows=rows, method="gptq-act", calibration=data, task=task,
                            refine_steps=64)  # fmt: skip
    assert [r.block for r in made.refined] == [0, 1, 2]
    assert sum(r.layers for r in made.refined) == sum(c.quantized for c in choices.values())
    assert any(r.kept for r in made.refined)
    for r in made.refined:
        assert (r.loss_after < r.loss_before) == r.kept
    bare = copy.deepcopy(model)
    quantize_layers_(bare, choices, extra_rows=rows, method="gptq-act", calibration=data, task=task)
    assert kl(model, refined_model, data, task) < kl(model, bare, data, task)
    for name, layer in made.layers.items():  # the model holds what is stored, and the codes fit their bits
        assert torch.equal(dict(refined_model.named_modules())[name].weight, layer.weight().to(torch.float32)), name
        for term in layer.terms + (layer.extra or []):
            codes = term.codes.to(torch.int64)
            low = -(1 << (term.bits - 1)) if term.codes.dtype == torch.int8 else 0  # tied digits: unsigned
            assert codes.min() >= low and codes.max() < low + (1 << term.bits), name


def test_the_packed_file_reproduces_the_reconstructed_model_to_the_bit(llama_plan, tmp_path):
    """Exported from scratch (quantized and reconstructed again) or from what `quantize_plan_`
    made, the file loads back as the applier's model; the FP model is left as it was."""
    model, data, task, plan = llama_plan
    assert_packed_file_reproduces(model, data, task, plan, tmp_path / "refined.safetensors")


def test_a_tuned_term_left_at_its_start_is_the_stored_term():
    """Zero shifts and scale changes give back GPTQ's terms exactly (codes, fp16 scales, offsets)."""
    from allocator.quantized.stored import stored_layer

    torch.manual_seed(0)
    w = torch.randn(24, 64)
    choice = allocator.Choice.parse("int3x2+1/4-g32")
    rows = torch.arange(0, 24, 4).numpy()
    stored = stored_layer(w, choice, rows, "rtn", None)
    again = TunedLayer(stored).frozen()
    assert torch.equal(again.weight(), stored.weight())
    torch.testing.assert_close(TunedLayer(stored).value().detach(), stored.weight(), rtol=0, atol=1e-6)
    for a, b in zip(again.terms + again.extra, stored.terms + stored.extra, strict=True):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.offset, b.offset)


def test_reconstruction_refuses_models_without_blocks_and_plans_without_calibration(llama_plan):
    model, _, _, plan = llama_plan
    with pytest.raises(PlanError, match="calibration"):
        apply_plan_(copy.deepcopy(model), plan.model_copy(update={"method": "rtn"}))
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    mlp_data = [torch.randn(8, 16) for _ in range(2)]
    mlp_plan = allocator.solve(mlp, mlp_data, budget="4bpw", choices=allocator.choice_grid((2, 4, 8), (1,), (16,)),
                               method="rtn").model_copy(update={"refine_steps": 4})  # fmt: skip
    before = [p.clone() for p in mlp.parameters()]
    with pytest.raises(PlanError, match=r"chain of repeated blocks.*--refine 0"):
        apply_plan_(mlp, mlp_plan, calibration=mlp_data)
    assert all(torch.equal(a, b) for a, b in zip(before, mlp.parameters(), strict=True))  # nothing changed
