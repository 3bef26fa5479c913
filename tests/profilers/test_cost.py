"""Cost model: byte-exact on known layers, BOPs, whole-model accounting."""

import math

import pytest
import torch
from torch import nn

from profilers.layers import find_targets, fixed_bytes, fp16_bytes
from profilers.quant.cost import layer_bops, weight_bytes
from profilers.types import Choice, LayerSpec


def test_known_linear_layer_is_byte_exact():
    # 384x384 at 4 bits: 73,728 bytes of codes; 384 rows x 6 groups x (fp16 scale + fp16 offset).
    assert weight_bytes(384, 384, Choice(bits=4, group_size=64)) == 73_728 + 384 * 6 * 4
    # That is the design's "b + 32/64" bits per weight.
    assert 8 * weight_bytes(384, 384, Choice(bits=4, group_size=64)) / (384 * 384) == 4.5


@pytest.mark.parametrize(
    ("rows", "cols", "choice", "expected"),
    [
        (
            10,
            100,
            Choice(bits=3, group_size=64),
            math.ceil(1000 * 3 / 8) + 10 * 2 * 4,
        ),  # ragged: 2 groups/row
        (10, 100, Choice(bits=3, group_size=None), math.ceil(1000 * 3 / 8) + 10 * 4),
        (10, 100, Choice(bits=3, group_size=64, symmetric=True), math.ceil(1000 * 3 / 8) + 10 * 2 * 2),
        (10, 100, Choice(bits=2, terms=3, group_size=50), 3 * (250 + 10 * 2 * 4)),
        (7, 9, Choice(bits=5, group_size=4), math.ceil(63 * 5 / 8) + 7 * 3 * 4),
        (7, 9, Choice.fp16(), 7 * 9 * 2),
    ],
)
def test_bytes(rows, cols, choice, expected):
    assert weight_bytes(rows, cols, choice) == expected


def test_bops_counts_bits_terms_and_activation_bits():
    spec = LayerSpec(name="l", kind="linear", shape=(8, 4), rows=8, cols=4, macs=1000)
    assert layer_bops(spec, Choice(bits=4, terms=2, group_size=4), act_bits=8) == 1000 * 4 * 8 * 2
    assert layer_bops(spec, Choice.fp16(), act_bits=16) == 1000 * 16 * 16


def test_fixed_bytes_count_everything_but_quantized_weights_once():
    model = nn.Sequential(nn.Embedding(50, 8), nn.LayerNorm(8), nn.Linear(8, 50))
    model[2].weight = model[0].weight  # tied: stored once
    model.register_buffer("steps", torch.zeros(3, dtype=torch.int64))
    targets = find_targets(model)
    assert len(targets) == 1 and targets[0].spec.aliases == ("2",)
    # LayerNorm weight+bias (16) and the head's bias (50) in fp16, the int64 buffer at 8 bytes.
    assert fixed_bytes(model, targets) == (16 + 50) * 2 + 3 * 8
    assert fp16_bytes(model) == (50 * 8 + 16 + 50) * 2 + 3 * 8
