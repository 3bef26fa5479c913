"""Plan files and the applier: round trips, refusals, nothing half-done."""

import json

import pytest
import torch
from torch import nn

import allocator
from allocator.errors import PlanError
from allocator.planning.plan import Plan
from allocator.quantized.apply import apply_choices_, apply_plan_
from profilers.quant.rounding import fake_quantize
from profilers.types import Choice, ProfileError, ProfileTable


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))


@pytest.fixture(scope="module")
def plan_and_data():
    model = _mlp()
    data = [torch.randn(16, 32) for _ in range(3)]
    plan = allocator.solve(
        model, data, budget="4bpw", choices=allocator.choice_grid((2, 4, 8), (1,), (16,)), method="rtn"
    )
    return plan, data


def test_plan_round_trips_byte_for_byte(plan_and_data, tmp_path):
    plan, _ = plan_and_data
    path = plan.save(tmp_path / "plan.json")
    loaded = Plan.load(path)
    assert loaded == plan
    assert loaded.save(tmp_path / "again.json").read_bytes() == path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.json", "plan.json"]  # no temp files left
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # normal permissions, not mkstemp's private ones


def test_corrupt_or_foreign_plan_files_are_refused(plan_and_data, tmp_path):
    plan, _ = plan_and_data
    text = plan.model_dump_json()
    cases = {
        "truncated.json": (text[: len(text) // 2], "not valid JSON"),
        "foreign.json": (json.dumps({"hello": 1}), "not an allocator plan"),
        "bad-bits.json": (text.replace('"bits":4', '"bits":11', 1), "bits must be one of"),
        "missing.json": (None, "does not exist"),
    }
    for name, (content, message) in cases.items():
        p = tmp_path / name
        if content is not None:
            p.write_text(content)
        with pytest.raises(PlanError, match=message) as info:
            Plan.load(p)
        assert "\n" not in str(info.value)
    with pytest.raises(ProfileError, match="not an allocator profile"):
        ProfileTable.load(tmp_path / "foreign.json")


def test_apply_quantizes_exactly_as_the_plan_says(plan_and_data):
    plan, _ = plan_and_data
    model = _mlp()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_plan_(model, plan)
    for name, lp in plan.layers.items():
        want = fake_quantize(original[f"{name}.weight"], lp.choice)
        assert torch.equal(dict(model.named_parameters())[f"{name}.weight"], want)
        # Biases are stored in fp16 and rounded accordingly.
        assert torch.equal(dict(model.named_parameters())[f"{name}.bias"], original[f"{name}.bias"].half().float())


def test_apply_refuses_the_wrong_model_and_changes_nothing(plan_and_data):
    plan, _ = plan_and_data
    other = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(PlanError, match="no layer named '4'"):
        apply_plan_(other, plan)
    wrong_shape = _mlp()
    wrong_shape[2] = nn.Linear(64, 32)
    with pytest.raises(PlanError, match="weight shape"):
        apply_plan_(wrong_shape, plan)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters(), strict=True))
    broken = _mlp()
    with torch.no_grad():
        broken[4].weight[0, 0] = float("inf")
    snapshot = broken[0].weight.detach().clone()
    with pytest.raises(PlanError, match="NaN or infinite"):
        apply_plan_(broken, plan)
    assert torch.equal(broken[0].weight, snapshot)


def test_fp16_choice_roundtrip_through_apply():
    model = _mlp()
    w = model[0].weight.detach().clone()
    apply_choices_(model, {"0": Choice.fp16()})
    assert torch.equal(model[0].weight, w.half().float())


def test_corrupt_extra_rows_are_refused(tmp_path):
    torch.manual_seed(1)
    model = _mlp()
    data = [torch.randn(16, 32) for _ in range(2)]
    table = allocator.profile(
        model, data, choices=allocator.choice_grid((2, 3), (1,), (16,)), fractions=8, method="rtn"
    )
    plan = None
    for bpw in (4.25, 4.5, 4.75, 5.0, 5.25, 5.5):
        plan = allocator.solve(table, budget=f"{bpw}bpw")
        if any(lp.choice.extra for lp in plan.layers.values()):
            break
    name = next(n for n, lp in plan.layers.items() if lp.choice.extra)
    from profilers.types import encode_indices

    bad = plan.model_copy(
        update={
            "layers": {**plan.layers, name: plan.layers[name].model_copy(update={"extra_rows": encode_indices([0])})}
        }
    )
    with pytest.raises(PlanError, match="extra-term rows"):
        apply_plan_(_mlp(), bad)
    garbage = plan.model_copy(
        update={"layers": {**plan.layers, name: plan.layers[name].model_copy(update={"extra_rows": "not base64!"})}}
    )
    with pytest.raises(PlanError, match="unreadable"):
        apply_plan_(_mlp(), garbage)


def test_gptq_plans_need_calibration_and_apply_gptq_exactly():
    from profilers.quant.rounding import reconstruct

    torch.manual_seed(3)
    model = _mlp()
    data = [torch.randn(16, 32) for _ in range(3)]
    plan = allocator.solve(model, data, budget="4.5bpw", choices=allocator.choice_grid((2, 3, 4), (1, 2), (16,)))
    assert plan.method == "gptq"
    with pytest.raises(PlanError, match="calibration batches"):
        apply_plan_(_mlp(), plan)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    hessians = allocator.layer_hessians(model, data, allocator.LogitsTask())
    apply_plan_(model, plan, calibration=data)
    for name, lp in plan.layers.items():
        rows = torch.as_tensor(lp.rows_with_extra_term()) if lp.choice.extra else None
        want = reconstruct(
            original[f"{name}.weight"], lp.choice, method="gptq", hessian=hessians[name], extra_rows=rows
        )
        assert torch.equal(dict(model.named_parameters())[f"{name}.weight"], want), name


def test_gptq_lowers_the_output_error_rtn_leaves():
    from profilers.quant.rounding import reconstruct

    torch.manual_seed(4)
    x = torch.randn(512, 64) * torch.logspace(-1, 1, 64)
    w = torch.randn(48, 64) * 0.1
    h = x.T @ x
    # GPTQ is greedy: it does not beat rounding to nearest everywhere, but it does at 2-3 bits.
    for label in ("int2-g16", "int3-ch", "int2x2-g32"):
        c = Choice.parse(label)
        rtn = reconstruct(w, c, method="rtn")
        gptq = reconstruct(w, c, method="gptq", hessian=h)
        assert ((w - gptq) @ x.T).pow(2).sum() < ((w - rtn) @ x.T).pow(2).sum(), label


def test_gptq_from_calibration_streams_block_by_block_with_the_same_result(tmp_path):
    """From calibration data the applier and the export hold one block's `H` at a time; the
    result is the one every layer's `H` computed at once gives, to the bit."""
    from allocator.quantized.apply import hessian_groups, layer_hessians
    from allocator.quantized.export import export_quantized
    from tests.profilers.test_streaming import batches, tiny_llama

    model, data = tiny_llama(layers=3, tied=False), batches()
    task = allocator.LogitsTask(causal=True)
    plan = allocator.solve(model, data, task=task, budget="4bpw", choices=allocator.choice_grid((2, 4), (1,), (32,)),
                           fractions=4, exclude=["lm_head", "model.embed_tokens"])  # fmt: skip
    groups = list(hessian_groups(model, list(plan.layers), plan.method, None, data, task))
    assert [len(names) for names, _ in groups] == [0, 7, 7, 7, 0]  # outside the blocks, each block, no-H layers
    hessians = layer_hessians(model, data, task)
    for names, group in groups:
        for name in names:
            torch.testing.assert_close(group[name], hessians[name], rtol=1e-6, atol=1e-6)
    import copy

    streamed = apply_plan_(copy.deepcopy(model), plan, calibration=data, task=task)
    at_once = apply_plan_(copy.deepcopy(model), plan, hessians=hessians)
    for (name, a), b in zip(streamed.state_dict().items(), at_once.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    one = export_quantized(model, plan, tmp_path / "streamed.safetensors", calibration=data, task=task)
    two = export_quantized(model, plan, tmp_path / "at_once.safetensors", hessians=hessians)
    from safetensors import safe_open  # (the header's metadata order varies from save to save)

    with safe_open(one, "pt") as a, safe_open(two, "pt") as b:
        assert a.metadata() == b.metadata() and list(a.keys()) == list(b.keys())
        for key in a.keys():  # noqa: SIM118 (safe_open is not iterable)
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_a_sequential_plan_is_applied_and_exported_alike_on_the_quantized_blocks(tmp_path):
    """A sequential GPTQ plan takes each block's `H` on the blocks before it as quantized: the
    applier and the packed file agree to the bit, and both differ from FP-input calibration."""
    import copy

    from allocator.quantized.export import export_quantized
    from allocator.quantized.load import load_quantized
    from tests.profilers.test_streaming import batches, tiny_llama

    model, data = tiny_llama(layers=3, tied=False), batches()
    task = allocator.LogitsTask(causal=True)
    plan = allocator.solve(model, data, task=task, budget="3bpw", choices=allocator.choice_grid((2, 3, 4), (1,), (32,)),
                           method="gptq-act", sequential=True, fractions=0,
                           exclude=["lm_head", "model.embed_tokens"])  # fmt: skip
    assert plan.sequential and plan.method == "gptq-act"
    fake = apply_plan_(copy.deepcopy(model), plan, calibration=data, task=task)
    fp_inputs = apply_plan_(copy.deepcopy(model), plan.model_copy(update={"sequential": False}), calibration=data,
                            task=task)  # fmt: skip
    path = export_quantized(model, plan, tmp_path / "seq.safetensors", calibration=data, task=task)
    loaded = load_quantized(path, model=tiny_llama(layers=3, tied=False), kernels=False)
    first, last = "model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.down_proj.weight"
    weights = dict(fake.named_parameters())
    assert torch.equal(weights[first], dict(fp_inputs.named_parameters())[first])  # block 0 sees FP inputs either way
    assert not torch.equal(weights[last], dict(fp_inputs.named_parameters())[last])
    with torch.no_grad():  # (rotary frequencies, not stored, stay fp32 in both)
        for batch in data:
            assert torch.equal(task.forward(loaded, batch), task.forward(fake, batch))
    untouched = dict(tiny_llama(layers=3, tied=False).named_parameters())[last]
    assert torch.equal(dict(model.named_parameters())[last], untouched)  # the FP model is left as it was
