"""Packed Linear layers that run on PyTorch's low-bit CPU matmul, never expanding their weight.

`torch.ops.aten._weight_int4pack_mm_for_cpu` multiplies activations by 4-bit codes `q` in groups
of 32, 64, 128 or 256 input columns, each group with a scale `s` and a zero `z`: the weight is
`(q - 8) s + z`. Every choice the planner makes is a sum of such pieces:
- a code of 2-4 bits is a 4-bit code with the same step (`z` absorbs the offset);
- a code of 5-8 bits is two 4-bit digits, `q = 16 q_hi + q_lo`, the high digit with step `16 s`
  (each digit centred on the kernel's 8, so that the zeros stay of the weight's size);
- several terms (residual, tied, joint) are one call over the terms side by side along the
  input: `Σ_t x W_tᵀ = [x, x, ...] [W_1 | W_2 | ...]ᵀ`;
- a fractional extra term is a second call over its rows, added with `index_add_`;
- a rotated choice rotates the input first (`x R`, `InputRotation`: ±1 Hadamard matrices, exact
  in any dtype, with the `1/√b` in the layer's scales), since the terms hold `W R`:
  `x Wᵀ = (x R) (W R)ᵀ`; layers reading one input with the same signs rotate it once;
- a group that is not one of the kernel's sizes (per channel, 96, ...) repeats its scale over the
  largest kernel group dividing it and the row length.
The kernel is fast for bfloat16 activations (AVX512-BF16 / AMX on x86); float32 inputs take a slow
scalar path. So `compute_dtype` defaults to bfloat16, the scales and zeros the kernel reads are
bfloat16, and a loaded model computes in bfloat16 end to end (`run_in_dtype_`: no casts around
each layer). From `DENSE_FROM` rows of activations on (a prompt), a layer expands its weight from
the packed codes and float16 scales (kept per group of the choice, finer than the kernel's) into
one dense matmul (oneDNN, AMX where the CPU has it): at 512 tokens that beats the int4 loop,
which also grows with the number of pieces, while one-token steps stay on the kernel. The packed
layout depends on the CPU, so it is made when the file is loaded, never stored.

What cannot take the kernel (row lengths not a multiple of 32, groups of 8 or 16, Conv and
Embedding layers, llama.cpp block types) keeps the dequantizing module; `kernel_report` lists
which layers run where.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from profilers.quant.rotation import rotation_block, unrotate

from .modules import PackedWeight, QuantEmbedding, QuantLinear
from .packing import unpack_bits

__all__ = [
    "DENSE_FROM",
    "KERNEL_GROUPS",
    "Int4Matmul",
    "KernelLinear",
    "blocked_layout",
    "int4_available",
    "kernel_report",
    "run_in_dtype_",
    "unpack_codes",
    "use_kernels",
]

KERNEL_GROUPS = (256, 128, 64, 32)  # the group sizes `_weight_int4pack_mm_for_cpu` takes
_INNER_K_TILES = 8
DENSE_FROM = 256  # rows of activations from which a layer expands its weight for one dense matmul
# A Hadamard block of up to `_ONE_ROTATION` columns rotates as one matmul; a larger one as two, the
# inner over `_INNER_ROTATION` columns. At 2048 rows: 128 columns as one 0.51 ms, as 2 x 64 1.43 ms;
# 512 columns as one 8.0 ms, as 8 x 64 5.7 ms (bfloat16, 2 threads).
_INNER_ROTATION, _ONE_ROTATION = 64, 256


def int4_available() -> bool:
    """Whether this PyTorch build has the CPU int4 matmul."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


def kernel_group(cols: int, group: int) -> int | None:
    """The kernel group for a row length and the choice's group: the largest kernel size dividing
    both (None when none does)."""
    return next((g for g in KERNEL_GROUPS if cols % g == 0 and group % g == 0), None)


def unsupported(packed: PackedWeight) -> str | None:
    """Why a packed Linear weight cannot run on the int4 kernel (None when it can)."""
    if not int4_available():
        return "this PyTorch has no CPU int4 matmul"
    choice = packed.choice
    if choice.ggml is not None:
        return f"llama.cpp type {choice.ggml}"
    if len(packed.shape) != 2:
        return f"a {len(packed.shape)}-D weight"
    if kernel_group(packed.cols, packed.group) is None:
        return f"row length {packed.cols} with groups of {packed.group}: the kernel takes groups of 32-256"
    return None


@functools.cache
def blocked_layout() -> int:
    """The row block of this CPU's int4 pack when it is the blocked layout `unpack_codes` reads
    (byte `(block, k, d)` holding rows `d` and `d + block/2` of column `k`: 64 rows with AVX512,
    32 with AVX2), probed once; 0 when it is not. With a known layout, prompts expand the weight
    for a dense matmul, and rows are padded to whole blocks."""
    if not int4_available():
        return 0
    for block in (64, 32):
        q = torch.randint(0, 16, (2 * block, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, _INNER_K_TILES)
        if tuple(p.shape) == (2 * block, 32) and torch.equal(unpack_codes(p, 2 * block, 64, block).int(), q):
            return block
    return 0


def unpack_codes(packed: Tensor, rows: int, cols: int, block: int | None = None) -> Tensor:
    """The `[rows, cols]` uint8 codes of an int4 pack in the blocked layout (`rows` whole blocks)."""
    block = block or blocked_layout()
    pairs = packed.reshape(rows // block, cols, block // 2)
    return torch.cat((pairs & 15, pairs >> 4), dim=2).transpose(1, 2).reshape(rows, cols)


def _row_multiple() -> int:
    return max(blocked_layout(), 16)  # the kernel takes rows in multiples of 16


class _Pieces:
    """4-bit codes with their scales and zeros (one per group of the choice), gathered piece by piece."""

    def __init__(self, rows: int, owner: Tensor) -> None:
        self.rows, self.owner = rows, owner  # owner: each kernel group's group of the choice
        self.codes: list[Tensor] = []  # [rows, cols] int32 in 0..15
        self.meta: list[Tensor] = []  # [choice groups, rows, 2] float32 (scale, zero)

    def add(self, codes: Tensor, scale: Tensor, zero: Tensor) -> None:
        self.codes.append(codes.to(torch.int32))
        self.meta.append(torch.stack((scale.t(), zero.t()), dim=-1))

    def pack(self, dtype: torch.dtype, factor: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        """The int4 pack; its scales and zeros per kernel group in `dtype` (what the kernel reads,
        `[pieces * kernel groups, rows, 2]`); and the same per group of the choice, for expanding the
        weight, in float16 (`[pieces * choice groups, rows, 2]`, 8x finer than bfloat16; float32
        when `dtype` is). Rows are padded to the pack's block; scales and zeros are times `factor`."""
        codes, meta = torch.cat(self.codes, dim=1), torch.stack(self.meta) * factor
        pad = -self.rows % _row_multiple()
        if pad:  # zero rows (code 8, scale 0, zero 0), cut off after the matmul
            codes = torch.cat((codes, torch.full((pad, codes.shape[1]), 8, dtype=torch.int32)))
            meta = torch.cat((meta, torch.zeros(*meta.shape[:2], pad, 2)), dim=2)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), _INNER_K_TILES)
        kernel = meta[:, self.owner].flatten(0, 1).to(dtype).contiguous()
        fine = meta.flatten(0, 1).to(torch.float32 if dtype == torch.float32 else torch.float16)
        return packed, kernel, fine.contiguous()


def _add_term(pieces: _Pieces, codes: Tensor, bits: int, bias: int, scale: Tensor, zero: Tensor | None) -> int:
    """One term `(codes - bias) scale + zero` as 4-bit digits in `pieces`; returns the digit count.

    Each digit is centred on the kernel's 8 (`(digit - m) step`, `m` half the digit's range), so
    that what the kernel adds per group is of the weight's size, not 8 steps away from it: the
    zero, stored in the compute dtype, then rounds by the weight's own precision. `scale` and
    `zero` are per kernel group (`[rows, cols / group]`, float32)."""
    zero = torch.zeros_like(scale) if zero is None else zero
    if bits <= 4:  # (q - m) s + (z + (m - bias) s)
        m = 1 << (bits - 1)
        pieces.add(codes + (8 - m), scale, zero + (m - bias) * scale)
        return 1
    hi, lo = codes >> 4, codes & 15  # (q_hi - m) 16 s + (q_lo - 8) s + (z + (16 m + 8 - bias) s)
    m = 1 << (bits - 5)
    pieces.add(hi + (8 - m), 16 * scale, zero + (16 * m + 8 - bias) * scale)
    pieces.add(lo, scale, torch.zeros_like(scale))
    return 2


class InputRotation(nn.Module):
    """`√b x R` for every layer whose weight is stored rotated with the same signs (`R = D H`: the
    column signs, then block Hadamard, `profilers.quant.rotation`), as `[tokens, cols]` rows in the
    compute dtype. The ±1 Hadamard matrices are exact in any dtype; the layers' scales carry the
    `1/√b`. A block of up to `_ONE_ROTATION` columns is one matmul; a larger one, of `b = a c`
    columns, is `H_b = H_a ⊗ H_c` (Sylvester), so a row `X` (`a x c`) becomes `H_a X H_c`: two
    small matmuls instead of one over a `b x b` matrix (1 MB at 512, read for every token). One
    token rotates in float32 (faster for a single row), a prompt in the
    compute dtype (7x faster at 512 tokens than float32 and its casts).

    Layers reading the same input (q/k/v, gate/up) share one rotation, which keeps its last input
    and output: the second and third layers take the rotated rows without computing them again.
    """

    def __init__(self, signs: Tensor) -> None:
        super().__init__()
        self.cols = signs.numel()
        block = rotation_block(self.cols)
        inner = block if block <= _ONE_ROTATION else _INNER_ROTATION
        self.register_buffer("signs", signs.float().clone())
        self.register_buffer("hadamard_inner", _hadamard(inner))
        self.register_buffer("hadamard_outer", _hadamard(block // inner) if block > inner else None)
        self._last: tuple[Tensor, int, torch.dtype, Tensor] | None = None

    def forward(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        last = self._last
        if last is not None and last[0] is x and last[1] == x._version and last[2] == dtype:
            return last[3]
        rows = x.reshape(-1, self.cols)
        work = torch.float32 if rows.shape[0] < DENSE_FROM else dtype
        y = rows.to(work) * self.signs.to(work)
        inner = self.hadamard_inner.to(work)
        c = inner.shape[0]
        if self.hadamard_outer is None:
            y = y.reshape(-1, self.cols // c, c) @ inner
        else:
            a = self.hadamard_outer.shape[0]
            y = self.hadamard_outer.to(work) @ (y.reshape(-1, a, c) @ inner)
        y = y.reshape(rows.shape).to(dtype).contiguous()
        self._last = (x, x._version, dtype, y)
        return y


class Int4Matmul(nn.Module):
    """`x Wᵀ` for a packed weight on the CPU int4 kernel (no bias); see the module docstring."""

    def __init__(self, packed: PackedWeight, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        reason = unsupported(packed)
        if reason is not None:
            raise ValueError(f"{packed.choice.label} cannot run on the int4 kernel: {reason}")
        choice, rows, cols = packed.choice, packed.rows, packed.cols
        self.rows, self.cols, self.label = rows, cols, choice.label
        self.compute_dtype = compute_dtype
        group = kernel_group(cols, packed.group)
        assert group is not None
        self.group = group
        self.register_buffer("owner", torch.arange(cols // group) * group // packed.group)  # kernel -> choice group

        def per_group(meta: Tensor | None) -> Tensor | None:
            return None if meta is None else meta.float()

        bias, n = packed._bias(), rows * cols
        pieces = _Pieces(rows, self.owner)
        self.copies = 0  # how many times the input is repeated along the columns
        for t in range(packed.n_terms):
            codes = unpack_bits(getattr(packed, f"codes_{t}"), choice.bits, n).reshape(rows, cols)
            self.copies += _add_term(pieces, codes, choice.bits, bias, per_group(packed._scale(t)),
                                     per_group(packed._zero(t)))  # fmt: skip
        # a rotated layer's input is rotated by unnormalized ±1 Hadamard matrices (exact in any
        # dtype) and its scales and zeros carry the 1/√b instead
        block = rotation_block(cols) if choice.rotated else 1  # at least 32: the kernel takes whole 32-groups
        self.norm = 1 / math.sqrt(block)
        weight, meta, fine = pieces.pack(compute_dtype, self.norm)
        self.register_buffer("weight_packed", weight)
        self.register_buffer("scale_zeros", meta)
        self.register_buffer("fine_meta", fine)
        self.extra_copies = 0
        if packed.has_extra:
            k = packed.extra_rows.numel()
            codes = unpack_bits(packed.extra_codes, choice.bits, k * cols).reshape(k, cols)
            extra = _Pieces(k, self.owner)
            zero = getattr(packed, "extra_zero", None)
            self.extra_copies = _add_term(extra, codes, choice.bits, bias, per_group(packed.extra_scale),
                                          per_group(zero))  # fmt: skip
            weight, meta, fine = extra.pack(compute_dtype, self.norm)
            self.register_buffer("extra_rows", packed.extra_rows.clone())
            self.register_buffer("extra_packed", weight)
            self.register_buffer("extra_scale_zeros", meta)
            self.register_buffer("extra_fine_meta", fine)
        self.rotation = InputRotation(packed.signs) if choice.rotated else None

    def _expand_t(self, packed: Tensor, fine: Tensor, copies: int, dtype: torch.dtype) -> Tensor:
        """`Σ_piece (q - 8) s + z` of one pack, transposed: `[cols, padded rows]` in `dtype`.

        The blocked pack holds, per block of rows and per column, byte `d` with rows `d` (low
        nibble) and `d + block/2` (high nibble): read along a column, both halves are contiguous, so
        the transposed weight is written by one vectorized `addcmul` per half and piece, in float32
        arithmetic from the float16 scales and zeros (bfloat16 ones, as the kernel reads them, put
        SmolLM2's 4.25 bpw plan at 1.0023x the float32 path's perplexity, these at 1.0013x), and
        rounded once to `dtype` (several pieces sum in float32 first)."""
        n, groups, block = packed.shape[0], self.cols // self.group, blocked_layout()
        half = block // 2
        pairs = packed.view(n // block, copies, groups, self.group, half)
        meta = fine.float().view(copies, -1, n, 2)[:, self.owner]  # [copies, groups, n, 2]
        scale, zero = meta[..., 0], meta[..., 1]
        offset = (zero - 8 * scale).sum(0).view(groups, 1, n // block, 2, half)
        scale = scale.reshape(copies, groups, 1, n // block, 2, half)
        out = torch.empty(groups, self.group, n // block, 2, half, dtype=dtype if copies == 1 else torch.float32)
        for h, nibble in enumerate((pairs & 15, pairs >> 4)):
            codes = nibble.permute(1, 2, 3, 0, 4)  # [copies, groups, group, blocks, half]
            torch.addcmul(offset[:, :, :, h], codes[0], scale[0, :, :, :, h], out=out[:, :, :, h])
            for p in range(1, copies):
                out[:, :, :, h].addcmul_(codes[p], scale[p, :, :, :, h])
        return out.view(self.cols, n).to(dtype)

    def expand_t(self, dtype: torch.dtype | None = None) -> Tensor:
        """The whole weight as the kernel multiplies by it, transposed (`[cols, padded rows]`, in the
        compute dtype unless told), from the packed codes: a rotated one is `W R / √b`."""
        dtype = dtype or self.compute_dtype
        if not self.extra_copies:
            return self._expand_t(self.weight_packed, self.fine_meta, self.copies, dtype)
        w = self._expand_t(self.weight_packed, self.fine_meta, self.copies, torch.float32)
        extra = self._expand_t(self.extra_packed, self.extra_fine_meta, self.extra_copies, torch.float32)
        return w.index_add_(1, self.extra_rows, extra[:, : self.extra_rows.numel()]).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        if self.rotation is not None:
            xc = self.rotation(x, self.compute_dtype)
        else:
            xc = x.reshape(-1, self.cols).to(self.compute_dtype).contiguous()
        if xc.shape[0] >= DENSE_FROM and blocked_layout():  # a prompt: one dense matmul beats the int4 loop
            return (xc @ self.expand_t())[:, : self.rows].to(x.dtype).reshape(*lead, self.rows)
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        y = mm(xc.repeat(1, self.copies) if self.copies > 1 else xc, self.weight_packed, self.group, self.scale_zeros)
        y = y[:, : self.rows]
        if self.extra_copies:
            xe = xc.repeat(1, self.extra_copies) if self.extra_copies > 1 else xc
            ye = mm(xe, self.extra_packed, self.group, self.extra_scale_zeros)[:, : self.extra_rows.numel()]
            y = y.index_add(1, self.extra_rows, ye)
        return y.to(x.dtype).reshape(*lead, self.rows)

    def dequantize(self) -> Tensor:
        """The weight the kernel multiplies by (`[rows, cols]`, float32), as `W`, not `W R`."""
        with torch.no_grad():
            if not blocked_layout():  # the kernel itself, on the identity
                eye = torch.eye(self.cols, dtype=torch.float32)
                return self.forward(eye).float().t().contiguous()
            w = self.expand_t(torch.float32)[:, : self.rows].t() / self.norm
            return unrotate(w, self.rotation.signs) if self.rotation is not None else w.contiguous()

    def nbytes(self) -> int:
        """Bytes the kernel holds (codes, scales, zeros, rows, signs, rotation)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"{self.rows}x{self.cols}, {self.label}, int4 groups of {self.group}, {self.compute_dtype}"


def _hadamard(b: int) -> Tensor:
    """The `b x b` Sylvester Hadamard matrix of ±1 (`b` a power of two; orthonormal once divided by `√b`)."""
    h = torch.ones(1, 1)
    while h.shape[0] < b:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


class KernelLinear(nn.Module):
    """`nn.Linear` on an `Int4Matmul`: `y = x Wᵀ + b`, the weight never expanded.

    `weight` rebuilds the matrix from the kernel (for inspection; slow, and in the kernel's
    precision)."""

    def __init__(self, in_features: int, out_features: int, matmul: Int4Matmul, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.matmul = matmul
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def weight(self) -> Tensor:
        return self.matmul.dequantize()

    def forward(self, x: Tensor) -> Tensor:
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def use_kernels(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Swap, in place, every packed Linear layer that the int4 kernel takes for its `KernelLinear`
    (layers sharing a packed weight share the kernel, layers rotated alike share the rotation of
    their input); the packed codes go with the old module."""
    built: dict[int, Int4Matmul] = {}
    rotations: dict[bytes, InputRotation] = {}  # by their signs: layers of one width share one
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, QuantLinear) or unsupported(child.packed) is not None:
                continue
            key = id(child.packed)
            if key not in built:
                built[key] = matmul = Int4Matmul(child.packed, compute_dtype)
                if matmul.rotation is not None:
                    matmul.rotation = rotations.setdefault(matmul.rotation.signs.numpy().tobytes(), matmul.rotation)
            bias = None if child.bias is None else child.bias.detach()
            setattr(parent, name, KernelLinear(child.in_features, child.out_features, built[key], bias))
    return model


def run_in_dtype_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Make a packed model compute in `dtype` end to end, in place: every floating-point parameter
    (embeddings, norms, biases, an unplanned head) is cast, packed embeddings return their rows in
    `dtype`, and the model casts floating-point inputs (images) to it, so activations reach the
    kernels already in their dtype (no casts around each layer) and an unplanned head moves half
    the bytes per token in bfloat16. Buffers keep their dtype: the packed scales and zeros, the
    kernels' own, and the model's (rotary frequencies stay float32)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)  # in place: tied parameters stay one tensor
    for m in model.modules():
        if isinstance(m, QuantEmbedding):
            m.out_dtype = dtype
    model.register_forward_pre_hook(functools.partial(_cast_inputs, dtype=dtype), with_kwargs=True)
    return model


def _cast_inputs(module: nn.Module, args: tuple, kwargs: dict, *, dtype: torch.dtype) -> tuple[tuple, dict]:
    """Floating-point inputs of a model run in `dtype` (images, embeddings) cast to it; ids stay."""

    def cast(v: object) -> object:
        return v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def kernel_report(model: nn.Module) -> dict[str, str]:
    """Per packed layer of a loaded model, where it runs: `int4 kernel` or why it dequantizes."""
    out: dict[str, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, KernelLinear):
            out[name] = f"int4 kernel ({m.matmul.compute_dtype})"
        elif hasattr(m, "packed") and isinstance(m.packed, PackedWeight):
            reason = unsupported(m.packed) if isinstance(m, QuantLinear) else f"a {type(m).__name__}"
            out[name] = f"dequantized on call ({reason or 'kernels off'})"
    return out
