"""A `GgmlTensor` as the bytes llama.cpp reads: one row after another, each row its blocks.

The byte layout of every block follows llama.cpp's `block_*` structs (`ggml-common.h`); the
tests decode the bytes with `gguf.quants.dequantize` and compare with `GgmlTensor.dequantize`,
bit for bit.
"""

from __future__ import annotations

import numpy as np

from .fit import GgmlTensor
from .types import GgmlType

__all__ = ["pack_ggml"]

# MXFP4 stores its codes as indices into llama.cpp's kvalues_mxfp4 (0..12, then the negatives);
# ours index the sorted levels (-12..12): this maps ours to theirs.
_MXFP4_STORED = np.array([15, 14, 13, 12, 11, 10, 9, 0, 1, 2, 3, 4, 5, 6, 7], dtype=np.uint8)


def _half(x: np.ndarray) -> np.ndarray:
    """fp16 values `[n]` as `[n, 2]` little-endian bytes."""
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(-1, 2)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """`[n, 32]` values < 16 as 16 bytes: element j in the low nibble of byte j, j+16 in the high."""
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _high_bits(q: np.ndarray, shift: int) -> np.ndarray:
    """Bit `shift` of each of 32 values `[n, 32]` as 4 bytes, element j at bit j (little-endian)."""
    return np.packbits(((q >> shift) & 1).astype(np.uint8), axis=-1, bitorder="little")


def _k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and mins per super-block, `[n, 8]` each."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    return out


def _crumbs(q: np.ndarray, groups: int) -> np.ndarray:
    """2-bit values `[n, 128·groups]` packed four to a byte: in each group of 128, element
    `s·32 + b` at byte `b`, bits `2s`."""
    n = q.shape[0]
    q = q.reshape(n, groups, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(n, groups * 32)


def _blocks(t: GgmlType, q: np.ndarray, f: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The parts of every block, in storage order, each `[n_blocks, bytes]`."""
    n = q.shape[0]
    name = t.gguf
    if name == "Q8_0":
        return [_half(f["d"]), q.astype(np.int8).view(np.uint8)]
    if name in ("Q4_0", "IQ4_NL"):
        return [_half(f["d"]), _nibbles(q - t.qmin)]
    if name == "Q4_1":
        return [_half(f["d"]), _half(f["m"]), _nibbles(q)]
    if name in ("Q5_0", "Q5_1"):
        u = q - t.qmin
        head = [_half(f["d"])] + ([_half(f["m"])] if name == "Q5_1" else [])
        return [*head, _high_bits(u, 4), _nibbles(u & 0xF)]
    if name == "Q2_0":  # element j at byte j // 4, bits 2 (j % 4), stored as q + 1
        u = (q + 1).reshape(n, 16, 4)
        return [_half(f["d"]), u[..., 0] | (u[..., 1] << 2) | (u[..., 2] << 4) | (u[..., 3] << 6)]
    if name == "MXFP4":
        return [f["e"].reshape(n, 1), _nibbles(_MXFP4_STORED[q])]
    if name == "Q2_K":
        return [(f["sc"] | (f["mn"] << 4)).astype(np.uint8), _crumbs(q, 2), _half(f["d"]), _half(f["dmin"])]
    if name == "Q3_K":
        u = (f["sc"] + 32).astype(np.uint8)  # [n, 16] 6-bit
        scales = np.zeros((n, 12), dtype=np.uint8)
        for i in range(16):
            scales[:, i % 8] |= (u[:, i] & 0xF) << (4 * (i // 8))
            scales[:, 8 + i % 4] |= (u[:, i] >> 4) << (2 * (i // 4))
        hmask = np.zeros((n, 32), dtype=np.uint8)
        for s in range(8):
            hmask |= (q[:, 32 * s : 32 * (s + 1)] >= 0).astype(np.uint8) << s
        return [hmask, _crumbs(np.where(q >= 0, q, q + 4), 2), scales, _half(f["d"])]
    if name in ("Q4_K", "Q5_K"):
        low = (q & 0xF).reshape(n, 4, 2, 32)
        qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
        head = [_half(f["d"]), _half(f["dmin"]), _k_scales(f["sc"], f["mn"])]
        if name == "Q4_K":
            return [*head, qs]
        qh = np.zeros((n, 32), dtype=np.uint8)
        for s in range(8):
            qh |= ((q[:, 32 * s : 32 * (s + 1)] >> 4) & 1).astype(np.uint8) << s
        return [*head, qh, qs]
    if name == "Q6_K":
        u = (q + 32).reshape(n, 2, 128)
        low = (u & 0xF).reshape(n, 2, 2, 64)
        ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
        qh = _crumbs((u >> 4).reshape(n, 256), 2)
        return [ql, qh, f["sc"].astype(np.int8).view(np.uint8), _half(f["d"])]
    if name == "IQ4_XS":
        u = (f["sc"] + 32).astype(np.uint16)  # [n, 8] 6-bit
        high = np.zeros(n, dtype=np.uint16)
        for i in range(8):
            high |= (u[:, i] >> 4) << (2 * i)
        low = (u & 0xF).astype(np.uint8)
        scales_l = low[:, 0::2] | (low[:, 1::2] << 4)
        codes = q.reshape(n, 8, 32)
        qs = (codes[:, :, :16] | (codes[:, :, 16:] << 4)).reshape(n, 128)
        return [_half(f["d"]), high.astype("<u2").view(np.uint8).reshape(n, 2), scales_l, qs]
    raise ValueError(f"no packer for {name}")


def pack_ggml(tensor: GgmlTensor) -> np.ndarray:
    """The tensor's bytes, `[rows, row bytes]` uint8 (C order: the tensor's data in a GGUF file)."""
    t = tensor.type
    rows, cols = tensor.codes.shape
    n = rows * (cols // t.block)
    q = tensor.codes.numpy().astype(np.int64).reshape(n, t.block)
    per_block = {k: v.numpy().reshape(n, -1) for k, v in tensor.grid.fields.items()}
    if t.scales in ("d", "d_min", "e8m0"):
        per_block = {k: v.reshape(n) for k, v in per_block.items()}
    if t.scales.startswith("k_"):
        per_block = {k: v.reshape(n) if k in ("d", "dmin") else v for k, v in per_block.items()}
    parts = _blocks(t, q, per_block)
    out = np.concatenate([p.astype(np.uint8, copy=False).reshape(n, -1) for p in parts], axis=1)
    if out.shape[1] != t.block_bytes:
        raise AssertionError(f"{t.gguf} block is {out.shape[1]} bytes, expected {t.block_bytes}")
    return out.reshape(rows, -1)
