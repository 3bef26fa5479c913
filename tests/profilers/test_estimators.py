"""The hessian and measured estimators, and validation, on models where answers are known."""

import numpy as np
import pytest
import torch
from torch import nn

import allocator
from allocator.measure.validation import validate_profile
from profilers.estimators import HessianProfiler, MeasuredProfiler, make_profiler
from profilers.quant.rounding import fake_quantize
from profilers.tasks import EmbeddingTask, LogitsTask
from profilers.types import Choice, ProfileError

GRID = [Choice(bits=b, group_size=16) for b in (2, 3, 4)] + [Choice.fp16()]


def test_hessian_is_exact_for_a_linear_model_with_isotropic_output_weights():
    # e = W x, Rademacher pseudo-gradients: λ_o = 1 for every output, so the estimate is
    # ½ / N · tr(ΔW XᵀX ΔWᵀ) = ½ E‖ΔW x‖² exactly (the token/row cross terms it drops are zero).
    torch.manual_seed(0)
    model = nn.Linear(32, 8, bias=False)
    data = [torch.randn(64, 32)]
    table = HessianProfiler(draws=64).profile(model, data, choices=GRID, task=EmbeddingTask("none", normalize=False))
    x = data[0]
    for opt in table.layers[0].options:
        delta = fake_quantize(model.weight, opt.choice) - model.weight
        exact = 0.5 * (x @ delta.T).pow(2).sum(1).mean().item()
        assert opt.loss == pytest.approx(exact, rel=0.05), opt.choice.label


def test_hessian_fractions_follow_its_own_row_benefit():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 4))
    table = HessianProfiler().profile(model, [torch.randn(32, 32)], choices=GRID[:1], fractions=4)
    losses = [o.loss for o in table.layers[0].options]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0]


def test_measured_is_the_divergence_of_the_quantized_model():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))
    data = [torch.randn(8, 16), torch.randn(8, 16)]
    task = LogitsTask()
    table = MeasuredProfiler().profile(model, data, choices=GRID, task=task)
    ref = [model(x).detach() for x in data]
    layer = table.layers[1]
    for opt in layer.options:
        saved = model[2].weight.detach().clone()
        with torch.no_grad():
            model[2].weight.copy_(fake_quantize(saved, opt.choice))
            kl = torch.cat([task.divergence(r, model(x), None) for r, x in zip(ref, data, strict=True)]).mean()
            model[2].weight.copy_(saved)
        # profiles store losses clipped at 0 (an fp16 copy's KL is float noise around 0)
        assert opt.loss == pytest.approx(max(0.0, float(kl)), rel=1e-5, abs=1e-7)
    # The weights are back as they were.
    assert torch.equal(model(data[0]), ref[0])


class Blocks(nn.Module):
    """Embedding, a ModuleList of blocks, a head: the measured profiler replays finished blocks."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(3))
        self.head = nn.Linear(16, 6)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean(1))


def test_replay_gives_the_same_measurements_as_full_passes():
    torch.manual_seed(3)
    model = Blocks()
    data = [torch.randint(0, 40, (6, 5)) for _ in range(2)]
    fast = MeasuredProfiler(replay=True).profile(model, data, choices=GRID)
    slow = MeasuredProfiler(replay=False).profile(model, data, choices=GRID)
    assert fast.settings["replay"] is True and slow.settings["replay"] is False
    for a, b in zip(fast.layers, slow.layers, strict=True):
        for oa, ob in zip(a.options, b.options, strict=True):
            assert oa.loss == pytest.approx(ob.loss, rel=1e-4, abs=1e-10)


def test_replay_that_does_not_reproduce_the_output_falls_back_to_full_passes():
    """A head whose output changes call by call: the replay check (a few targets) catches it."""

    class Drifting(Blocks):
        def forward(self, ids):
            self.calls = getattr(self, "calls", 0) + 1
            return super().forward(ids) + self.calls

    torch.manual_seed(3)
    data = [torch.randint(0, 40, (8, 5)) for _ in range(2)]
    with pytest.warns(UserWarning, match="replaying upstream outputs did not reproduce"):
        table = MeasuredProfiler(replay=True).profile(Drifting(), data, choices=GRID)
    assert table.settings["replay"] is False


def test_proxies_agree_with_measurement_and_validation_says_so():
    torch.manual_seed(4)
    model = Blocks()
    data = [torch.randint(0, 40, (16, 5)) for _ in range(2)]
    measured = MeasuredProfiler().profile(model, data, choices=GRID)
    from scipy.stats import spearmanr

    truth = [o.loss for layer in measured.layers for o in layer.options if o.choice.quantized]
    for name in ("fisher", "hessian"):
        table = make_profiler(name, draws=8).profile(model, data, choices=GRID)
        est = [o.loss for layer in table.layers for o in layer.options if o.choice.quantized]
        assert spearmanr(est, truth).statistic > 0.85, name
    table = make_profiler("fisher", draws=8).profile(model, data, choices=GRID, fractions=4)
    v = validate_profile(model, data, table, LogitsTask(), pairs=30, plans=8)
    assert v.pairs == 30 and v.plans == 8 and v.batches == 2
    assert v.spearman > 0.8 and v.additivity_pearson > 0.8
    assert 0.5 < v.additivity_ratio < 2.0


def test_validation_measures_only_the_batches_whose_outputs_fit(monkeypatch):
    """A 262k vocabulary's FP logits of 32 windows are 17 GB: the measurement keeps what fits."""
    import allocator.measure.validation as validation

    torch.manual_seed(4)
    model = Blocks()
    data = [torch.randint(0, 40, (16, 5)) for _ in range(3)]
    table = make_profiler("fisher", draws=2).profile(model, data, choices=GRID)
    per_batch = 16 * 6 * 4  # float32 logits of one batch (16 samples, 6 classes)
    monkeypatch.setattr(validation, "REFERENCE_BYTES", 2 * per_batch + 1)
    assert validate_profile(model, data, table, LogitsTask(), pairs=4, plans=3).batches == 2
    monkeypatch.setattr(validation, "REFERENCE_BYTES", 1)
    assert validate_profile(model, data, table, LogitsTask(), pairs=4, plans=3).batches == 1


def test_unknown_profiler_is_named():
    with pytest.raises(ProfileError, match="choose one of fisher, hessian, measured"):
        make_profiler("exact")


def test_profile_solve_apply_with_fractions_uses_the_profiled_rows():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))
    data = [torch.randn(16, 32) for _ in range(2)]
    table = allocator.profile(
        model, data, choices=allocator.choice_grid((2, 3), (1,), (32,)), fractions=8, method="rtn"
    )
    fractional = []
    for bpw in np.linspace(3.0, 4.5, 16):
        plan = allocator.solve(table, budget=f"{bpw:.2f}bpw")
        fractional = [(n, lp) for n, lp in plan.layers.items() if lp.choice.extra]
        if fractional:
            break
    assert fractional, "some budget between whole settings should be best served by a fraction"
    name, lp = fractional[0]
    layer = table.layer(name)
    rows = np.sort(layer.extra_rows(lp.choice))
    original = dict(model.named_modules())[name].weight.detach().clone()
    allocator.apply_plan_(model, plan)
    want = fake_quantize(original, lp.choice, extra_rows=torch.as_tensor(rows))
    assert torch.equal(dict(model.named_modules())[name].weight, want)


def test_the_torch_free_names_and_defaults_match_the_estimators():
    import inspect

    from profilers.estimators import DEFAULT_DRAWS, DEFAULT_PROFILER, PROFILER_NAMES
    from profilers.estimators.registry import PROFILERS

    assert tuple(PROFILERS) == PROFILER_NAMES and DEFAULT_PROFILER in PROFILER_NAMES
    for name, draws in DEFAULT_DRAWS.items():
        assert inspect.signature(PROFILERS[name].__init__).parameters["draws"].default == draws


def test_the_divergence_of_a_large_vocabulary_is_computed_in_chunks_of_positions_exactly():
    from profilers.tasks import LogitsTask

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 40, 262_144, generator=g)  # 80 positions, 32 per chunk
    out = ref + 0.1 * torch.randn(ref.shape, generator=g)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 30:] = 0
    kl = LogitsTask(causal=True).divergence(ref, out, {"attention_mask": mask})
    whole = (ref.log_softmax(-1).exp() * (ref.log_softmax(-1) - out.log_softmax(-1))).sum(-1) * mask
    assert kl.shape == (2,)
    assert torch.allclose(kl, whole.sum(1), rtol=1e-5)
