"""Modules that keep their weight bit-packed: `QuantLinear`, `QuantConv2d`, `QuantEmbedding`.

Each holds a `PackedWeight`: per term, the packed codes, fp16 scales and zero points, and for a
fractional choice the extra term of its rows. The weight is rebuilt with exactly the arithmetic
of `profilers.quant.quantize.fake_quantize` (term by term, in float32), so a loaded model computes what
the fake-quantized one did. Linear and Conv layers dequantize on every call (or once, with
`cache=True`); an embedding dequantizes only the rows it looks up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from profilers.quant.rotation import unrotate
from profilers.types import Choice

from .packing import unpack_at, unpack_bits

__all__ = [
    "QUANT_MODULES",
    "PackedWeight",
    "QuantConv2d",
    "QuantEmbedding",
    "QuantLinear",
    "quantized_module",
    "register_quant_module",
]


class PackedWeight(nn.Module):
    """A weight of `shape` stored as bit-packed terms (see the module docstring).

    Args:
        shape: the weight's shape; its matrix view is `[shape[0], rest]`.
        choice: how it was quantized.
        codes: per term, packed codes of the whole matrix (symmetric codes biased to unsigned).
        scales: per stored term, `[rows, groups]` fp16 (tied: one, for term 1).
        zeros: per stored term, `[rows, groups]` fp16 or None.
        extra: for a fractional choice, `(rows, codes, scale, zero)` of the extra term.
        signs: for a rotated choice, the rotation's `[cols]` ±1 column signs; the terms hold
            `W R` and the weight is brought back with `Rᵀ` (`profilers.quant.rotation`).
        cache: keep the dequantized weight after the first use.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        choice: Choice,
        codes: list[Tensor],
        scales: list[Tensor],
        zeros: list[Tensor | None],
        extra: tuple[Tensor, Tensor, Tensor, Tensor | None] | None = None,
        *,
        signs: Tensor | None = None,
        cache: bool = False,
    ) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.choice = choice
        self.rows = shape[0]
        self.cols = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1
        group = choice.group_size or self.cols
        self.group = min(group, self.cols)
        self.n_terms = len(codes)
        for t, c in enumerate(codes):
            self.register_buffer(f"codes_{t}", c)
        for t, (s, z) in enumerate(zip(scales, zeros, strict=True)):
            self.register_buffer(f"scale_{t}", s)
            if z is not None:
                self.register_buffer(f"zero_{t}", z)
        self.n_meta = len(scales)
        self.has_extra = extra is not None
        if extra is not None:
            rows, c, s, z = extra
            self.register_buffer("extra_rows", rows.to(torch.int64))
            self.register_buffer("extra_codes", c)
            self.register_buffer("extra_scale", s)
            if z is not None:
                self.register_buffer("extra_zero", z)
        if choice.rotated != (signs is not None):
            raise ValueError(f"{choice.label} needs rotation signs exactly when it is rotated")
        if signs is not None:
            self.register_buffer("signs", signs.float())
        self.cache = cache
        self._cached: Tensor | None = None

    # -- term pieces ------------------------------------------------------------------------
    def _bias(self) -> int:
        return 1 << (self.choice.bits - 1) if self.choice.symmetric else 0

    def _scale(self, t: int) -> Tensor:
        if self.choice.kind == "tied":
            base = self.scale_0.float()
            return (base / float(1 << (self.choice.bits * t))).half() if t else self.scale_0
        return getattr(self, f"scale_{t}")

    def _zero(self, t: int) -> Tensor | None:
        return getattr(self, f"zero_{t}", None)

    def _expand(self, meta: Tensor, cols: int) -> Tensor:
        return meta.float().repeat_interleave(self.group, dim=1)[:, :cols]

    def _term(self, codes: Tensor, scale: Tensor, zero: Tensor | None) -> Tensor:
        out = (codes.float() - self._bias()) * self._expand(scale, self.cols)
        if zero is not None:
            out += self._expand(zero, self.cols)
        return out

    # -- reconstruction ---------------------------------------------------------------------
    def dequantize(self) -> Tensor:
        """The float32 weight, in its original shape."""
        if self._cached is not None:
            return self._cached
        n = self.rows * self.cols
        total = None
        for t in range(self.n_terms):
            codes = unpack_bits(getattr(self, f"codes_{t}"), self.choice.bits, n).reshape(self.rows, self.cols)
            term = self._term(codes, self._scale(t), self._zero(t))
            total = term if total is None else total + term
        assert total is not None
        if self.has_extra:
            k = self.extra_rows.numel()
            codes = unpack_bits(self.extra_codes, self.choice.bits, k * self.cols).reshape(k, self.cols)
            total[self.extra_rows] = total[self.extra_rows] + self._term(
                codes, self.extra_scale, getattr(self, "extra_zero", None)
            )
        if self.choice.rotated:
            total = unrotate(total, self.signs)
        weight = total.reshape(self.shape)
        if self.cache:
            self._cached = weight
        return weight

    def rows_of(self, index: Tensor) -> Tensor:
        """Dequantized rows `index` (`[len(index), cols]`) without rebuilding the whole matrix."""
        index = index.reshape(-1).to(torch.int64)
        if self._cached is not None:
            return self._cached.reshape(self.rows, self.cols)[index]
        cols = torch.arange(self.cols, dtype=torch.int64)
        elements = index.unsqueeze(1) * self.cols + cols
        total = None
        for t in range(self.n_terms):
            codes = unpack_at(getattr(self, f"codes_{t}"), self.choice.bits, elements)
            zero = self._zero(t)
            term = self._term(codes, self._scale(t)[index], None if zero is None else zero[index])
            total = term if total is None else total + term
        assert total is not None
        if self.has_extra:
            slot = torch.full((self.rows,), -1, dtype=torch.int64)
            slot[self.extra_rows] = torch.arange(self.extra_rows.numel())
            local = slot[index]
            hit = local >= 0
            if hit.any():
                where = local[hit]
                codes = unpack_at(self.extra_codes, self.choice.bits, where.unsqueeze(1) * self.cols + cols)
                zero = getattr(self, "extra_zero", None)
                total[hit] += self._term(codes, self.extra_scale[where], None if zero is None else zero[where])
        return unrotate(total, self.signs) if self.choice.rotated else total

    def extra_repr(self) -> str:
        return f"shape={self.shape}, choice={self.choice.label}"


# Module swapping by type (as optimum-quanto registers its qmodules): the FP module class ->
# a function building its packed counterpart from the module and its `PackedWeight`.
QUANT_MODULES: dict[type[nn.Module], Callable[[nn.Module, PackedWeight], nn.Module]] = {}

M = TypeVar("M", bound=nn.Module)


def register_quant_module(fp_type: type[nn.Module]) -> Callable[[type[M]], type[M]]:
    """Class decorator: the decorated class, built as `cls.from_module(module, packed)`, stands
    in for `fp_type` modules in a packed model."""

    def register(cls: type[M]) -> type[M]:
        QUANT_MODULES[fp_type] = cls.from_module  # type: ignore[attr-defined]
        return cls

    return register


def quantized_module(module: nn.Module, packed: PackedWeight) -> nn.Module:
    """The packed counterpart of `module` (looked up by its type, then its base classes)."""
    for cls in type(module).__mro__:
        if cls in QUANT_MODULES:
            return QUANT_MODULES[cls](module, packed)
    raise TypeError(f"cannot store a {type(module).__name__} packed; packed types: "
                    f"{', '.join(t.__name__ for t in QUANT_MODULES)}")  # fmt: skip


class _PackedLayer(nn.Module):
    """A layer whose weight is a `PackedWeight`, dequantized when the layer runs; its bias kept."""

    def __init__(self, packed: PackedWeight, bias: Tensor | None) -> None:
        super().__init__()
        self.packed = packed
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def weight(self) -> Tensor:
        return self.packed.dequantize()

    def _weight_and_bias(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.packed.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)


def _bias_of(module: nn.Module) -> Tensor | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach().clone()


@register_quant_module(nn.Linear)
class QuantLinear(_PackedLayer):
    """`nn.Linear` with a packed weight: `y = x Wᵀ + b` with `W = Σ_t scale_t ⊙ Q_t`."""

    def __init__(self, in_features: int, out_features: int, packed: PackedWeight, bias: Tensor | None) -> None:
        super().__init__(packed, bias)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_module(cls, module: nn.Linear, packed: PackedWeight) -> QuantLinear:
        return cls(module.in_features, module.out_features, packed, _bias_of(module))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, *self._weight_and_bias(x))


@register_quant_module(nn.Conv2d)
class QuantConv2d(_PackedLayer):
    """`nn.Conv2d` (zeros padding) with a packed weight."""

    def __init__(self, conv: nn.Conv2d, packed: PackedWeight, bias: Tensor | None) -> None:
        super().__init__(packed, bias)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size

    @classmethod
    def from_module(cls, module: nn.Conv2d, packed: PackedWeight) -> QuantConv2d:
        return cls(module, packed, _bias_of(module))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, *self._weight_and_bias(x), self.stride, self.padding, self.dilation, self.groups)


@register_quant_module(nn.Embedding)
class QuantEmbedding(nn.Module):
    """`nn.Embedding` with a packed table; looks up and dequantizes only the rows asked for."""

    def __init__(self, emb: nn.Embedding, packed: PackedWeight) -> None:
        super().__init__()
        if emb.max_norm is not None:
            raise ValueError("embeddings with max_norm cannot be stored packed")
        self.num_embeddings, self.embedding_dim, self.padding_idx = (
            emb.num_embeddings,
            emb.embedding_dim,
            emb.padding_idx,
        )
        self.packed = packed
        self.out_dtype = torch.float32  # the dtype of the rows it returns (the model's activations)

    @classmethod
    def from_module(cls, module: nn.Embedding, packed: PackedWeight) -> QuantEmbedding:
        return cls(module, packed)

    @property
    def weight(self) -> Tensor:
        return self.packed.dequantize()

    def forward(self, ids: Tensor) -> Tensor:
        return self.packed.rows_of(ids).reshape(*ids.shape, self.embedding_dim).to(self.out_dtype)
