"""Bit-packing: exact round trips for every width and size."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from allocator.quantized.packing import pack_bits, packed_size, unpack_at, unpack_bits


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 8), count=st.integers(0, 300), seed=st.integers(0, 2**31))
def test_pack_unpack_round_trip_is_exact(bits, count, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (count,), generator=g)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(count * bits / 8) == packed_size(count, bits)
    assert torch.equal(unpack_bits(packed, bits, count), codes.to(torch.uint8))
    if count:
        idx = torch.randint(0, count, (17,), generator=g)
        assert torch.equal(unpack_at(packed, bits, idx), codes[idx].to(torch.uint8))


@pytest.mark.parametrize("bits", range(1, 9))
def test_known_layouts_and_extremes(bits):
    top = (1 << bits) - 1
    codes = torch.tensor([top, 0, top, 1, 0, top, top, 0, 1])
    assert torch.equal(unpack_bits(pack_bits(codes, bits), bits, codes.numel()), codes.to(torch.uint8))
    assert pack_bits(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    assert pack_bits(torch.tensor([5, 3]), 4).tolist() == [0x35]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_bits(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match=r"1\.\.8 bits"):
        pack_bits(torch.tensor([1]), 9)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 3, 5)
