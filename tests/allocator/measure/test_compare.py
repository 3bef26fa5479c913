"""`compare`: the plan's measured loss on the calibration batches it was scored on."""

import copy

import pytest
import torch
from torch import nn

import allocator
from allocator.measure.evaluate import compare
from allocator.quantized.apply import apply_plan_
from profilers.tasks import LogitsTask
from profilers.types import Choice


def test_the_plan_is_also_measured_on_its_calibration_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10)).eval()
    calib = [torch.randn(16, 32) for _ in range(2)]
    evals = [torch.randn(16, 32) * 2 for _ in range(2)]  # another distribution: another loss
    task = LogitsTask()
    grid = [Choice(bits=b, group_size=32) for b in (2, 3, 4, 8)]
    plan = allocator.solve(model, calib, budget="4.5bpw", task=task, choices=grid, method="gptq")
    result = compare(model, plan, evals, task, uniform=[], calibration=calib)

    planned = apply_plan_(copy.deepcopy(model), plan, calibration=calib, task=task)
    with torch.no_grad():
        by_hand = torch.cat([task.divergence(model(x), planned(x), x) for x in calib]).mean().item()
    assert result.plan_on_calibration == pytest.approx(by_hand, rel=1e-5)
    assert result.plan_on_calibration > 0 and result.plan_on_calibration != pytest.approx(result.plan.divergence)
    hessians = allocator.layer_hessians(model, calib, task)
    assert compare(model, plan, evals, task, uniform=[], hessians=hessians).plan_on_calibration is None  # no batches


def test_a_peer_that_cannot_serve_the_plan_is_listed_as_skipped_and_the_rest_is_measured():
    from allocator.measure.peers import PeerSkipped, PeerVariant

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 10)).eval()
    calib = [torch.randn(16, 32)]
    plan = allocator.solve(model, calib, budget="5bpw", task=LogitsTask(), method="rtn",
                           choices=[Choice(bits=b, group_size=32) for b in (2, 4, 8)])  # fmt: skip

    why = "modelopt: the effective_bits target 3.47 is infeasible for this model"

    def refuse():
        raise PeerSkipped(why)

    result = compare(model, plan, calib, LogitsTask(), uniform=[], skipped=["hqq: not installed"],
                     peers=[PeerVariant("ModelOpt AutoQuantize", refuse)])  # fmt: skip
    assert result.skipped == ["hqq: not installed", why]
    assert result.peers == [] and result.plan.divergence >= 0
