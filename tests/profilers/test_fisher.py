"""Empirical-Fisher profiler: exact first-order terms, exactness on linear models, tied weights."""

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from profilers.capture import Call
from profilers.estimators.fisher import FisherProfiler, shrunk_ratios
from profilers.estimators.weight_grads import dense_products, embedding_products
from profilers.quant.rounding import fake_quantize
from profilers.tasks import EmbeddingTask, LogitsTask
from profilers.types import Choice, ProfileError

CHOICES = [
    Choice(bits=2, group_size=8),
    Choice(bits=4, group_size=8),
    Choice(bits=8, group_size=None),
    Choice.fp16(),
]


def profile_fisher(model, data, *, choices, task=None, draws=2, seed=0, pool_rows=True, **kw):
    profiler = FisherProfiler(draws=draws, seed=seed, pool_rows=pool_rows)
    return profiler.profile(model, data, choices=choices, task=task, **kw)


def _errors(weight):
    w = weight.detach().reshape(weight.shape[0], -1)
    return torch.stack([fake_quantize(w, c) - w for c in CHOICES])


def test_linear_first_order_terms_equal_output_space_products():
    torch.manual_seed(0)
    lin = nn.Linear(12, 7)
    x, g = torch.randn(5, 9, 12), torch.randn(5, 9, 7)
    errors = _errors(lin.weight)
    call = Call(0, lin, x, torch.empty(0))
    got, none = dense_products(call, g, errors, n_paired=0)
    want = torch.stack([(g * F.linear(x, e)).sum(dim=(1, 2)) for e in errors], dim=1)
    assert none is None and torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    a, per_row = dense_products(call, g, errors, n_paired=2)  # per row for the first two stack rows
    want_rows = torch.stack([(g * F.linear(x, e)).sum(dim=1) for e in errors[:2]], dim=1)  # [n, 2, out]
    assert torch.allclose(per_row, want_rows, rtol=1e-4, atol=1e-5)
    assert torch.allclose(a, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 3, padding=1),
        nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding=2, bias=False),
        nn.Conv2d(4, 6, 3, groups=2, padding="same"),
        nn.Conv2d(4, 4, (2, 3), groups=4, padding="valid"),
    ],
)
def test_conv_first_order_terms_equal_output_space_products(conv):
    torch.manual_seed(1)
    x = torch.randn(3, 4, 9, 9)
    out = conv(x)
    g = torch.randn_like(out)
    errors = _errors(conv.weight)
    got, _ = dense_products(Call(0, conv, x, out), g, errors, n_paired=0)
    want = torch.stack(
        [(g * conv._conv_forward(x, e.reshape(conv.weight.shape), None)).sum(dim=(1, 2, 3)) for e in errors],
        dim=1,
    )
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_embedding_first_order_terms_use_only_looked_up_rows():
    torch.manual_seed(2)
    emb = nn.Embedding(30, 16)
    ids = torch.randint(0, 30, (4, 11))
    g = torch.randn(4, 11, 16)
    rows = torch.unique(ids)
    row_errors = _errors(emb.weight)[:, rows]
    call = Call(0, emb, ids, torch.empty(0))
    got, _ = embedding_products(call, g, rows, row_errors, n_paired=0)
    full = _errors(emb.weight)
    want = torch.stack([(g * F.embedding(ids, e)).sum(dim=(1, 2)) for e in full], dim=1)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    a, per_row = embedding_products(call, g, rows, row_errors, n_paired=len(CHOICES))
    assert torch.allclose(per_row.sum(dim=-1), want, rtol=1e-4, atol=1e-5)
    assert torch.allclose(a, want, rtol=1e-4, atol=1e-5)


def test_linear_embedding_model_score_is_half_the_squared_output_change():
    # e = W x (no pooling, no normalisation): the Fisher score is exactly ½ E‖ΔW x‖².
    torch.manual_seed(3)
    model = nn.Linear(16, 8, bias=False)
    data = [torch.randn(32, 16) for _ in range(2)]
    table = profile_fisher(model, data, choices=CHOICES, task=EmbeddingTask("none", normalize=False), draws=200)
    x = torch.cat(data)
    for opt in table.layers[0].options:
        delta = fake_quantize(model.weight, opt.choice) - model.weight
        exact = 0.5 * (x @ delta.T).pow(2).sum(dim=1).mean().item()
        assert abs(opt.loss - exact) <= 5 * opt.loss_stderr + 1e-12, (opt.choice.label, opt.loss, exact)
        assert opt.loss_stderr <= 0.2 * exact + 1e-12


def _fisher_quadratic_form(model, x, choice):
    """½ mean over samples of Δzᵀ (diag p − p pᵀ) Δz for a linear classifier `z = W x`."""
    p = model(x).softmax(-1).detach()
    dz = x @ (fake_quantize(model.weight, choice) - model.weight).T.detach()
    return 0.5 * ((p * dz.pow(2)).sum(-1) - (p * dz).sum(-1).pow(2)).mean().item()


def test_linear_classifier_score_is_the_fisher_quadratic_form_exactly():
    # With few classes each is one backward pass weighted by its probability: the whole squared
    # sums (`pool_rows=False`) are the quadratic form itself, whatever the draws or seed.
    torch.manual_seed(4)
    model = nn.Linear(10, 5)
    data = [torch.randn(64, 10)]
    tables = [profile_fisher(model, data, choices=CHOICES[:2], task=LogitsTask(), draws=d, seed=s, pool_rows=False)
              for d, s in ((1, 0), (7, 3))]  # fmt: skip
    assert tables[0].settings["exact_fisher"] and tables[0].settings["draws"] == 5
    for a, b in zip(tables[0].layers[0].options, tables[1].layers[0].options, strict=True):
        assert a.loss == pytest.approx(_fisher_quadratic_form(model, data[0], a.choice), rel=1e-4)
        assert a.loss == b.loss


def test_many_class_score_estimates_the_fisher_quadratic_form():
    # Above `EXACT_CLASSES` the draws are random-sign sketches of the same Fisher.
    torch.manual_seed(4)
    model = nn.Linear(10, 40)
    data = [torch.randn(64, 10)]
    table = profile_fisher(model, data, choices=CHOICES[:2], task=LogitsTask(), draws=300, pool_rows=False)
    assert not table.settings["exact_fisher"]
    for opt in table.layers[0].options:
        exact = _fisher_quadratic_form(model, data[0], opt.choice)
        assert abs(opt.loss - exact) <= 5 * opt.loss_stderr, (opt.choice.label, opt.loss, exact)
        assert opt.loss_stderr < 0.1 * exact


def test_pooled_scores_are_far_less_noisy_when_the_whole_sums_are_noisy():
    # Few samples and two sketched draws (a profile's case): each option's ratio of whole to
    # row-diagonal score is too noisy to use, so it is shrunk to the layer's; across seeds each
    # option's share of its layer's total spreads far less than with whole squared sums.
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 40))
    data = [torch.randn(2, 32) for _ in range(4)]
    grid = [Choice(bits=b, group_size=16) for b in (2, 3, 4, 5)]
    spread = {}
    for pool in (True, False):
        runs = [profile_fisher(model, data, choices=grid, task=LogitsTask(), seed=s, pool_rows=pool) for s in range(6)]
        # each option's share of its layer's total: the within-layer choice the solver makes
        scores = torch.tensor([[o.loss / sum(x.loss for x in layer.options) for layer in t.layers
                                for o in layer.options] for t in runs])  # fmt: skip
        spread[pool] = float((scores.std(dim=0) / scores.mean(dim=0)).median())
    assert spread[True] < 0.5 * spread[False], spread


def test_pooled_ratios_are_each_options_own_when_precise_and_the_layers_when_noisy():
    # Two options whose whole-to-diagonal ratios differ 4x (2 and 0.5; the layer's is 1.25).
    loss, diag = torch.tensor([2.0, 0.5, 0.0]), torch.tensor([1.0, 1.0, 0.0])
    precise = shrunk_ratios(loss, 0.01 * loss, diag)
    torch.testing.assert_close(precise[:2], torch.tensor([2.0, 0.5]), rtol=0.01, atol=0)
    noisy = shrunk_ratios(loss, 3.0 * loss, diag)
    torch.testing.assert_close(noisy[:2], torch.tensor([1.25, 1.25]), rtol=0.01, atol=0)
    assert precise[2] == noisy[2] == 1.25  # an option without error takes the layer's ratio
    between = shrunk_ratios(loss, 0.7 * loss, diag)
    assert 1.25 < between[0] < 2.0 and 0.5 < between[1] < 1.25


def test_scores_predict_measured_divergence_on_an_mlp():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    data = [torch.randn(64, 32) for _ in range(2)]
    choices = [Choice(bits=b, group_size=16) for b in (3, 4, 5, 6)]
    task = LogitsTask()
    table = profile_fisher(model, data, choices=choices, task=task, draws=16)
    x = torch.cat(data)
    ref = model(x).detach()
    predicted, measured = [], []
    for layer in table.layers:
        mod = dict(model.named_modules())[layer.spec.name]
        for opt in layer.options:
            saved = mod.weight.detach().clone()
            with torch.no_grad():
                mod.weight.copy_(fake_quantize(saved, opt.choice))
                kl = task.divergence(ref, model(x), None).mean().item()
                mod.weight.copy_(saved)
            predicted.append(opt.loss)
            measured.append(kl)
    from scipy.stats import spearmanr

    assert spearmanr(predicted, measured).statistic > 0.9
    ratio = torch.tensor(predicted) / torch.tensor(measured)
    assert 0.6 < float(ratio.median()) < 1.6


def test_tied_weight_is_one_layer_scored_jointly():
    # y = W (W x): both uses of W change together; the score is ½ E‖Δy‖² to first order.
    torch.manual_seed(6)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8, bias=False)
            self.b = nn.Linear(8, 8, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    model = Twice()
    data = [torch.randn(64, 8)]
    choice = [Choice(bits=3, group_size=8)]
    table = profile_fisher(model, data, choices=choice, task=EmbeddingTask("none", normalize=False), draws=300)
    assert [layer.spec.name for layer in table.layers] == ["a"]
    assert table.layers[0].spec.aliases == ("b",)
    w = model.a.weight.detach()
    dw = fake_quantize(w, choice[0]) - w
    x = data[0]
    first_order = x @ (dw.T @ w.T + w.T @ dw.T)  # Δ(W W) x, linear in ΔW
    exact = 0.5 * first_order.pow(2).sum(1).mean().item()
    opt = table.layers[0].options[0]
    assert abs(opt.loss - exact) <= 5 * opt.loss_stderr


def test_in_place_activation_after_a_layer_does_not_corrupt_its_gradient():
    torch.manual_seed(7)
    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    inplace = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 4))
    inplace.load_state_dict(plain.state_dict())
    data = [torch.randn(16, 8)]
    a = profile_fisher(plain, data, choices=CHOICES, draws=3, seed=1)
    b = profile_fisher(inplace, data, choices=CHOICES, draws=3, seed=1)
    for la, lb in zip(a.layers, b.layers, strict=True):
        for oa, ob in zip(la.options, lb.options, strict=True):
            assert oa.loss == pytest.approx(ob.loss, rel=1e-5, abs=1e-12)


def test_unused_layer_is_left_in_fp16_with_a_warning():
    model = nn.ModuleDict({"used": nn.Linear(4, 4), "unused": nn.Linear(4, 4)})

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            return self.m["used"](x)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = profile_fisher(Wrapper(), [torch.randn(4, 4)], choices=CHOICES)
    assert table.names == ["m.used"]
    assert table.kept_fp16 == ("m.unused",)
    assert table.fixed_bytes == (4 + 16 + 4) * 2
    assert any("never ran" in str(w.message) for w in caught)


def test_bad_models_get_one_clear_error():
    with pytest.raises(ProfileError, match="nothing to quantize"):
        profile_fisher(nn.Sequential(nn.ReLU()), [torch.randn(2, 3)], choices=CHOICES)
    broken = nn.Linear(4, 2)
    with torch.no_grad():
        broken.weight[0, 0] = float("nan")
    with pytest.raises(ProfileError, match="NaN"):
        profile_fisher(broken, [torch.randn(2, 4)], choices=CHOICES)
    with pytest.raises(ProfileError, match="matches no quantizable layer"):
        profile_fisher(nn.Linear(4, 2), [torch.randn(2, 4)], choices=CHOICES, exclude=["decoder*"])
    with pytest.raises(ProfileError, match="no calibration batches"):
        profile_fisher(nn.Linear(4, 2), [], choices=CHOICES)


def test_profile_is_deterministic_and_round_trips(tmp_path):
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    data = [torch.randn(8, 1, 8, 8) for _ in range(2)]
    a = profile_fisher(model, data, choices=CHOICES, seed=3)
    b = profile_fisher(model, data, choices=CHOICES, seed=3)
    assert a.model_dump_json() == b.model_dump_json()
    assert a.layers[0].spec.macs == 4 * 6 * 6 * 9  # conv: outputs x (in/groups x kh x kw) per sample
    assert a.layers[1].spec.macs == 144 * 3
    path = a.save(tmp_path / "p.json")
    from profilers.types import ProfileTable

    assert ProfileTable.load(path) == a
    frac = profile_fisher(model, data, choices=CHOICES, seed=3, fractions=4)
    path = frac.save(tmp_path / "f.json")
    again = ProfileTable.load(path)
    assert again == frac and again.layers[0].channel_orders == frac.layers[0].channel_orders
    order = again.layers[0].extra_rows(Choice(bits=2, group_size=8, extra=1, extra_of=2))
    assert len(order) == 2 and list(order) == sorted(order)


def test_fractional_scores_are_exact_for_the_chosen_rows():
    # Linear embedding model: the score of any option is ½ E‖ΔW x‖², also for mixed-term rows.
    torch.manual_seed(9)
    model = nn.Linear(32, 16, bias=False)
    data = [torch.randn(32, 32) for _ in range(2)]
    table = profile_fisher(
        model,
        data,
        choices=[Choice(bits=2, group_size=32)],
        task=EmbeddingTask("none", normalize=False),
        draws=300,
        fractions=4,
    )
    layer = table.layers[0]
    assert [o.choice.label for o in layer.options] == ["int2-g32", "int2+1/4-g32", "int2+1/2-g32", "int2+3/4-g32"]
    x = torch.cat(data)
    losses = []
    for opt in layer.options:
        rows = torch.as_tensor(layer.extra_rows(opt.choice)) if opt.choice.extra else None
        assert rows is None or len(rows) == opt.choice.extra_rows(16)
        delta = fake_quantize(model.weight, opt.choice, extra_rows=rows) - model.weight
        # Fractions are scored on the samples after the 16 that chose their rows.
        scored = x[16:] if opt.choice.extra else x
        exact = 0.5 * (scored @ delta.T).pow(2).sum(dim=1).mean().item()
        assert abs(opt.loss - exact) <= 5 * opt.loss_stderr, (opt.choice.label, opt.loss, exact)
        losses.append(opt.loss)
    assert losses == sorted(losses, reverse=True)  # more rows with the extra term, less loss


def test_rows_that_gain_most_get_the_extra_term_first():
    # Rows of very different scale: the few large rows carry most of the error, and a good
    # order gives them the extra term first, removing far more than its share of the loss.
    torch.manual_seed(10)
    model = nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        model.weight.mul_(torch.logspace(0, 1.5, 16).unsqueeze(1)[torch.randperm(16)])
    data = [torch.randn(32, 32) for _ in range(2)]
    grid = [Choice(bits=2, group_size=32)]
    table = profile_fisher(model, data, choices=grid, task=EmbeddingTask("none", normalize=False), fractions=4)
    layer = table.layers[0]
    x = torch.cat(data)[16:]  # the samples that score the fractions
    w = model.weight.detach()

    def exact(choice, rows=None):
        delta = fake_quantize(w, choice, extra_rows=rows) - w
        return 0.5 * (x @ delta.T).pow(2).sum(dim=1).mean().item()

    base, full = exact(grid[0]), exact(Choice(bits=2, terms=2, group_size=32))
    quarter = Choice(bits=2, group_size=32, extra=1, extra_of=4)
    rows = torch.as_tensor(layer.extra_rows(quarter))
    assert base - exact(quarter, rows) > 0.5 * (base - full)
    largest = set(w.abs().amax(dim=1).topk(4).indices.tolist())
    assert len(largest & set(rows.tolist())) >= 3


def test_fractions_lie_between_their_two_whole_options_whatever_the_noise():
    # A classifier on 8 samples with 2 pseudo-label draws: every score is noisy. A fraction's
    # score is its base's minus a share of the gain of the next term, so it never leaves the
    # interval and never rises with more rows (scored on its own, it swung far outside both).
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 10))
    data = [torch.randn(2, 24) for _ in range(4)]
    grid = [Choice(bits=2, group_size=8), Choice(bits=2, terms=2, group_size=8)]
    for seed in (0, 1):
        table = profile_fisher(model, data, choices=grid, task=LogitsTask(), fractions=8, seed=seed)
        for layer in table.layers:
            by = {o.choice.label: o.loss for o in layer.options}
            base, full = by["int2-g8"], by["int2x2-g8"]
            fractions = [by[Choice(bits=2, group_size=8, extra=k, extra_of=8).label] for k in range(1, 8)]
            steps = [base, *fractions]
            assert all(min(base, full) - 1e-12 <= f <= base + 1e-12 for f in fractions), layer.spec.name
            assert all(b >= a - 1e-12 for a, b in zip(steps[1:], steps[:-1], strict=True)), layer.spec.name


def test_fractional_costs_grow_linearly():
    model = nn.Linear(64, 64)
    table = profile_fisher(model, [torch.randn(4, 64)], choices=[Choice(bits=3, group_size=32)], fractions=8)
    sizes = [o.bytes for o in table.layers[0].options]
    steps = {b - a for a, b in itertools.pairwise(sizes[1:])}
    assert len(steps) == 1  # every eighth of the rows adds the same bytes
    assert sizes[1] - sizes[0] == steps.pop() + 64 // 8  # ... plus the one-bit-per-row mask, once


def test_pseudo_gradients_have_the_softmax_fisher_as_second_moment():
    """Token logits over a vocabulary (sketched) and class logits with few classes (one draw per
    class): the mean outer product of the pseudo-gradients is `diag(p) − p pᵀ`, and each sums
    to zero over the classes, as `p − e_y` does."""
    from profilers.tasks import LogitsTask

    task = LogitsTask(causal=True)
    logits = torch.tensor([3.0, 1.0, 0.0, -2.0, -4.0])
    p = logits.softmax(-1)
    fisher = torch.diag(p) - torch.outer(p, p)
    out = logits.expand(1, 4000, 5)
    assert task.exact_draws(out) is None
    v = task.pseudo_gradient(out, {}, torch.Generator().manual_seed(0)).reshape(-1, 5)
    torch.testing.assert_close(v.T @ v / v.shape[0], fisher, rtol=0, atol=0.01)
    torch.testing.assert_close(v.sum(dim=-1), torch.zeros(4000), rtol=0, atol=1e-6)
    out = logits.expand(3, 5)
    assert task.exact_draws(out) == 5
    v = torch.stack([task.pseudo_gradient(out, {}, torch.Generator(), d)[0] for d in range(5)])
    torch.testing.assert_close(v.T @ v / 5, fisher, rtol=0, atol=1e-6)
    torch.testing.assert_close(v.sum(dim=-1), torch.zeros(5), rtol=0, atol=1e-6)
