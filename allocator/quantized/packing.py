"""Bit-packing of integer codes: `b` bits per code, no padding between codes.

Layout: code `e` (in row-major order) occupies bits `[e·b, e·b + b)` of a little-endian bit
stream, so `n` codes take exactly `ceil(n·b / 8)` bytes, the size the cost model charges. Eight
codes make one 64-bit word (8·b <= 64 for b <= 8), split into `b` bytes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["pack_bits", "packed_size", "unpack_at", "unpack_bits"]


def packed_size(count: int, bits: int) -> int:
    """Bytes that `count` codes of `bits` bits occupy."""
    return math.ceil(count * bits / 8)


def _check(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"packing takes 1..8 bits per code, got {bits}")


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack non-negative integer `codes` (any shape, each < 2**bits) into a uint8 tensor.

    Example:
        >>> pack_bits(torch.tensor([1, 2, 3, 0]), 2).tolist()  # 0b00_11_10_01
        [57]
    """
    _check(bits)
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    n = flat.numel()
    groups = math.ceil(n / 8)
    padded = torch.zeros(groups * 8, dtype=torch.int64)
    padded[:n] = flat
    shifts = torch.arange(8, dtype=torch.int64) * bits
    word = (padded.reshape(groups, 8) << shifts).sum(dim=1)  # the 8 codes never overlap
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    out = ((word.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[: packed_size(n, bits)].contiguous()


def _words(packed: Tensor, bits: int, groups: Tensor) -> Tensor:
    """The 64-bit words of the given 8-code groups (bytes past the stream's end read as 0), reading
    only their bytes: an embedding's lookup touches the rows it asks for, not the whole table."""
    index = groups.unsqueeze(1) * bits + torch.arange(bits, dtype=torch.int64)
    inside = index < packed.numel()
    parts = packed[index.clamp(max=max(packed.numel() - 1, 0))].to(torch.int64) * inside
    return (parts << (torch.arange(bits, dtype=torch.int64) * 8)).sum(dim=1)


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """The first `count` codes of a packed stream, as uint8."""
    _check(bits)
    if packed.numel() < packed_size(count, bits):
        raise ValueError(f"{packed.numel()} bytes cannot hold {count} codes of {bits} bits")
    groups = math.ceil(count / 8)
    words = _words(packed, bits, torch.arange(groups, dtype=torch.int64))
    codes = (words.unsqueeze(1) >> (torch.arange(8, dtype=torch.int64) * bits)) & ((1 << bits) - 1)
    return codes.reshape(-1)[:count].to(torch.uint8)


def unpack_at(packed: Tensor, bits: int, index: Tensor) -> Tensor:
    """The codes at element positions `index` (any shape), as uint8, without unpacking the rest."""
    _check(bits)
    flat = index.reshape(-1).to(torch.int64)
    if not flat.numel():
        return torch.zeros(index.shape, dtype=torch.uint8)
    words = _words(packed, bits, flat // 8)
    codes = (words >> ((flat % 8) * bits)) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(index.shape)
