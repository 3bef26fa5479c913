"""Python API: solve from a model or a profile, budgets, ties, infeasibility, uniform baselines."""

import pytest
import torch
from torch import nn

import allocator
from allocator.errors import AllocatorError, InfeasibleBudgetError
from allocator.planning.build import plan_from_profile


class TinyAttention(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.embed = nn.Embedding(50, d)
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, 10)

    def forward(self, ids):
        x = self.embed(ids)
        att = (self.query(x) @ self.key(x).transpose(1, 2)).softmax(-1)
        return self.out((att @ self.value(x)).mean(1))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = TinyAttention()
    data = [torch.randint(0, 50, (8, 6)) for _ in range(3)]
    grid = allocator.choice_grid((2, 3, 4, 8), (1, 2), (32, None))
    table = allocator.profile(model, data, choices=grid)
    return model, data, table


def test_plan_fits_every_budget_kind(setup):
    _, _, table = setup
    for text in ["3bpw", "70%", f"{(table.fixed_bytes + table.file_overhead + 7000) / 1000}kB"]:
        plan = allocator.solve(table, budget=text)
        assert plan.predicted.quantized_bytes <= plan.limits["bytes"]
        assert plan.solver.status == "optimal" and plan.solver.gap <= 1e-6
        assert set(plan.layers) == set(table.names)
        best = plan.best_uniform()
        if best is not None:
            assert plan.predicted.loss <= best.loss + 1e-12  # the plan never loses to uniform, predicted


def test_bops_budget_adds_a_second_resource(setup):
    _, _, table = setup
    plan = allocator.solve(table, budget=["6bpw", "3MBOPs"])
    assert plan.predicted.bops <= 3_000_000
    assert allocator.solve(table, budget="6bpw").predicted.bops > 3_000_000  # the BOPs budget binds
    assert set(plan.limits) == {"bytes", "bops"}


def test_infeasible_budget_names_the_smallest_feasible_one(setup):
    _, _, table = setup
    with pytest.raises(InfeasibleBudgetError, match=r"raise it to at least (\d+\.\d+)bpw") as info:
        allocator.solve(table, budget="1bpw")
    smallest = str(info.value).rsplit(" ", 1)[-1]
    plan = allocator.solve(table, budget=smallest)  # the named budget is feasible
    assert plan.predicted.bpw <= float(smallest.removesuffix("bpw")) + 1e-9
    with pytest.raises(InfeasibleBudgetError, match="below the smallest plan"):
        allocator.solve(table, budget="100B")


def test_ties_from_presets_share_one_choice(setup):
    model, data, _ = setup
    plan = allocator.solve(
        model, data, budget="3.5bpw", ties=["qkv"], choices=allocator.choice_grid((2, 3, 4, 8), (1,), (32,))
    )
    assert plan.ties == (("query", "key", "value"),)
    assert len({plan.layers[n].choice for n in ("query", "key", "value")}) == 1


def test_tie_lists_with_a_profile_and_bad_names(setup):
    _, _, table = setup
    plan = plan_from_profile(table, ["3bpw"], ties=[["query", "out"]])
    assert plan.layers["query"].choice == plan.layers["out"].choice
    with pytest.raises(AllocatorError, match="not in the profile"):
        plan_from_profile(table, ["3bpw"], ties=[["query", "nope"]])
    with pytest.raises(AllocatorError, match="need the model"):
        allocator.solve(table, budget="3bpw", ties=["qkv"])


def test_uniform_points_price_every_setting(setup):
    _, _, table = setup
    plan = allocator.solve(table, budget="3bpw")
    labels = [u.choice.label for u in plan.uniform]
    assert "fp16" not in labels and len(labels) == len(set(labels)) == 14
    for u in plan.uniform:
        assert u.bytes == table.fixed_bytes + table.file_overhead + sum(
            layer.option(u.choice).bytes for layer in table.layers
        )
        assert u.fits == (u.bytes - table.fixed_bytes - table.file_overhead <= plan.limits["bytes"])
    assert [u.loss for u in plan.uniform] == sorted(u.loss for u in plan.uniform)


def test_same_inputs_give_the_same_plan_file(setup):
    _, _, table = setup
    a = allocator.solve(table, budget="3bpw").model_dump_json()
    b = allocator.solve(table, budget="3bpw").model_dump_json()
    assert a == b


def test_solve_from_a_model_needs_data():
    with pytest.raises(AllocatorError, match="calibration data"):
        allocator.solve(nn.Linear(4, 4), budget="4bpw")


def test_pins_forbids_keeps_and_device_bits(setup):
    from allocator.planning.plan import Constraints

    _, _, table = setup
    c = Constraints(pins=(("out", "int8-ch"),), forbid=(("*", "int2*"),), keep=("embed",))
    plan = plan_from_profile(table, ["8bpw"], constraints=c)
    assert plan.layers["out"].choice.label == "int8-ch"
    assert plan.layers["embed"].choice.label == "fp16"
    assert not any(lp.choice.label.startswith("int2") for lp in plan.layers.values())
    assert plan.constraints == c
    device = plan_from_profile(table, ["6bpw"], constraints=Constraints(device_bits=3))
    assert all(lp.choice.quantized and lp.choice.bits <= 3 for lp in device.layers.values())
    for bad, message in [
        (Constraints(pins=(("nothing*", "int8-ch"),)), "matches no profiled layer"),
        (Constraints(pins=(("out", "int7-g16"),)), "no numbers for"),
        (Constraints(forbid=(("*", "int9*"),)), "matches no profiled choice"),
        (Constraints(pins=(("out", "int8-ch"),), forbid=(("out", "int8*"),)), "no option left"),
    ]:
        with pytest.raises(AllocatorError, match=message):
            plan_from_profile(table, ["4bpw"], constraints=bad)


def test_lossless_mode_finds_the_smallest_plan_within_the_loss(setup):
    from allocator.planning.plan import Constraints

    _, _, table = setup
    eps = allocator.solve(table, budget="3bpw").predicted.loss
    plan = plan_from_profile(table, [], constraints=Constraints(max_loss=eps))
    assert plan.solver.objective_is == "bytes" and plan.solver.status == "optimal"
    assert plan.predicted.loss <= eps * (1 + 1e-12)
    # No plan within the loss is smaller: a byte budget just below it admits none within eps.
    tighter = plan_from_profile(table, [f"{plan.predicted.bytes - 1}B"])
    assert tighter.predicted.loss > eps
    assert plan.best_uniform() is None or plan.best_uniform().bytes >= plan.predicted.bytes
    with pytest.raises(InfeasibleBudgetError, match="no plan reaches predicted loss"):
        plan_from_profile(table, [], constraints=Constraints(max_loss=0.0))
    with pytest.raises(InfeasibleBudgetError, match="does not fit"):
        plan_from_profile(table, [f"{plan.predicted.bytes - 1}B"], constraints=Constraints(max_loss=eps))


def test_every_solver_gives_a_plan_within_budget_and_the_exact_ones_agree(setup):
    _, _, table = setup
    plans = {m: allocator.solve(table, budget="3.5bpw", solver=m) for m in ("greedy", "cpsat", "milp", "lp", "auto")}
    for m, plan in plans.items():
        assert plan.predicted.quantized_bytes <= plan.limits["bytes"], m
        assert plan.solver.lower_bound <= plan.predicted.loss + 1e-12, m
    exact = {round(plans[m].predicted.loss, 12) for m in ("cpsat", "milp", "auto")}
    assert len(exact) == 1
