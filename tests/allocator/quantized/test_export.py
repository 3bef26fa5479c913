"""Packed files: exact round trips, packed modules against their reference, refusals."""

import copy
import os

import pytest
import torch
from torch import nn

import allocator
from allocator.errors import QuantizedFileError
from allocator.quantized.apply import layer_hessians
from allocator.quantized.export import export_quantized
from allocator.quantized.load import load_quantized
from allocator.quantized.modules import PackedWeight, QuantEmbedding, QuantLinear
from profilers.quant.quantize import dequantize_terms, quantize_terms
from profilers.quant.rotation import rotation_signs
from profilers.quant.rounding import fake_quantize, layer_terms
from profilers.types import Choice


class Net(nn.Module):
    """Embedding, conv, linear layers and a head tied to the embedding."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(300, 64, padding_idx=0)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.mix = nn.Linear(64 + 8, 96)
        self.head = nn.Linear(96, 300, bias=False)
        self.out = nn.Linear(96, 64)
        self.out.weight = nn.Parameter(torch.randn(64, 96) * 0.1)
        self.tied = nn.Linear(64, 300, bias=False)
        self.tied.weight = self.embed.weight

    def forward(self, ids):
        e = self.embed(ids)  # [n, T, 64]
        img = self.conv(e[:, :1, :].reshape(e.shape[0], 1, 8, 8)).mean(dim=(2, 3))
        h = torch.relu(self.mix(torch.cat([e.mean(1), img], dim=-1)))
        return self.head(h) + self.tied(self.out(h))


@pytest.fixture(scope="module", params=["rtn", "gptq", "gptq-act+hadamard"])
def profiled(request):
    model = Net()
    data = [torch.randint(0, 300, (8, 6)) for _ in range(3)]
    method, _, rotation = request.param.partition("+")
    grid = allocator.choice_grid((2, 3, 4, 8), (1, 2), (32, None), kinds=("residual", "tied", "joint"),
                                 rotation=rotation or "none")  # fmt: skip
    table = allocator.profile(model, data, choices=grid, fractions=4, method=method)
    hessians = layer_hessians(model, data, allocator.LogitsTask()) if method != "rtn" else None
    return model, data, table, hessians


@pytest.mark.parametrize("budget", ["2.6bpw", "3.5bpw", "5bpw", "9bpw", "14bpw"])
def test_round_trip_is_exact_and_the_file_is_as_large_as_predicted(profiled, tmp_path, budget):
    model, data, table, hessians = profiled
    plan = allocator.solve(table, budget=budget)
    path = export_quantized(model, plan, tmp_path / "m.safetensors", hessians=hessians)
    size = os.path.getsize(path)
    assert size <= plan.predicted.bytes
    payload = plan.predicted.bytes - plan.predicted.file_overhead
    assert size >= payload  # the header is the only addition, within its allowance
    fake = allocator.apply_plan_(copy.deepcopy(model), plan, hessians=hessians)
    loaded = load_quantized(path, model=Net(), kernels=False)
    for x in data:
        assert torch.equal(loaded(x), fake(x))
    if table.settings["method"] == "gptq-act":  # rotated: the file holds W R and its signs, and loads back exactly
        assert all(lp.choice.rotated for lp in plan.layers.values() if lp.choice.quantized)
    assert all(isinstance(getattr(loaded, name), QuantLinear) == plan.layers[name].choice.quantized
               for name in ("mix", "head", "out"))  # fmt: skip
    assert isinstance(loaded.embed, QuantEmbedding) == plan.layers["embed"].choice.quantized
    if plan.layers["embed"].choice.quantized:  # the tied head shares the embedding's packed table
        assert loaded.tied.packed is loaded.embed.packed
    else:
        assert loaded.tied.weight is loaded.embed.weight


def test_every_kind_and_fraction_reconstructs_exactly():
    torch.manual_seed(1)
    w = torch.randn(40, 70)
    for label in ["int3-g32", "int5s-ch", "int2x2-g32", "int2x3j-g32", "int4x2t-g32", "int3+3/8-g32", "int2x2+1/4-ch",
                  "int3+3/8-g32-had", "int4x2t-g32-had"]:  # fmt: skip
        if Choice.parse(label).extra:  # the extra term's rows keep the base terms
            c = Choice.parse(label)
            assert torch.equal(
                dequantize_terms(quantize_terms(w[:5], c.next_term)[:-1]),
                dequantize_terms(quantize_terms(w[:5], c.base)),
            )
        c = Choice.parse(label)
        terms = layer_terms(w, c.base)  # rotated choices: terms of W R
        rows = torch.arange(0, 40, 2)[: c.extra_rows(40)] if c.extra else None
        reference = fake_quantize(w, c, extra_rows=rows)
        from allocator.quantized.export import _pack_term

        codes = [_pack_term(t, c.bits, c.symmetric) for t in terms]
        scales = [t.scale for i, t in enumerate(terms) if c.kind != "tied" or i == 0]
        zeros = [t.offset for i, t in enumerate(terms) if c.kind != "tied" or i == 0]
        extra = None
        if c.extra:
            x = layer_terms(w[rows], c.next_term)[-1]
            extra = (rows, _pack_term(x, c.bits, c.symmetric), x.scale, x.offset)
        signs = rotation_signs(70) if c.rotated else None
        packed = PackedWeight(tuple(w.shape), c, codes, scales, zeros, extra, signs=signs)
        assert torch.equal(packed.dequantize(), reference), label
        ids = torch.tensor([5, 0, 39, 3, 3])
        assert torch.equal(packed.rows_of(ids), reference[ids]), label
        if not c.extra and not c.rotated:
            assert torch.equal(dequantize_terms(terms), reference)


def test_quant_linear_computes_with_the_dequantized_weight():
    torch.manual_seed(2)
    lin = nn.Linear(48, 20)
    c = Choice(bits=4, group_size=16)
    terms = quantize_terms(lin.weight.detach(), c)
    from allocator.quantized.export import _pack_term

    packed = PackedWeight((20, 48), c, [_pack_term(t, 4, False) for t in terms], [terms[0].scale], [terms[0].offset])
    q = QuantLinear(48, 20, packed, lin.bias.detach().clone())
    x = torch.randn(7, 48)
    want = x @ fake_quantize(lin.weight, c).T + lin.bias
    assert torch.allclose(q(x), want, atol=1e-6)
    assert sum(b.numel() * b.element_size() for b in packed.buffers()) < lin.weight.numel() * 4 / 5


def test_bad_files_are_refused_with_one_line(profiled, tmp_path):
    model, _, table, hessians = profiled
    plan = allocator.solve(table, budget="4bpw")
    good = export_quantized(model, plan, tmp_path / "good.safetensors", hessians=hessians)
    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.safetensors").write_bytes(os.urandom(4096))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    cases = {
        "truncated.safetensors": "not a readable safetensors file|lacks tensor|does not fit",
        "noise.safetensors": "not a readable safetensors file",
        "foreign.safetensors": "not an allocator packed model",
        "missing.safetensors": "does not exist",
    }
    for name, message in cases.items():
        with pytest.raises(QuantizedFileError, match=message) as info:
            load_quantized(tmp_path / name, model=Net())
        assert "\n" not in str(info.value)

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)

    with pytest.raises(QuantizedFileError, match="does not fit"):
        load_quantized(good, model=Other())
    with pytest.raises(QuantizedFileError, match="does not say how to rebuild"):
        load_quantized(good)


def test_export_takes_calibration_like_apply_and_gptq_needs_it(profiled, tmp_path):
    model, data, table, hessians = profiled
    plan = allocator.solve(table, budget="3.5bpw")
    from_data = export_quantized(model, plan, tmp_path / "a.safetensors", calibration=data)
    assert torch.equal(
        load_quantized(from_data, model=Net(), kernels=False)(data[0]),
        allocator.apply_plan_(copy.deepcopy(model), plan, calibration=data)(data[0]),
    )
    if hessians is None:  # RTN needs no calibration at all
        return
    from_h = export_quantized(model, plan, tmp_path / "b.safetensors", hessians=hessians)
    x = data[0]
    assert torch.equal(load_quantized(from_data, model=Net(), kernels=False)(x),
                       load_quantized(from_h, model=Net(), kernels=False)(x))
    with pytest.raises(allocator.PlanError, match="scored for GPTQ"):
        export_quantized(model, plan, tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()
