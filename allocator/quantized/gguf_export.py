"""A plan of llama.cpp block types written as a GGUF file that llama.cpp runs.

The file is the source GGUF (the one the model was read from) with every planned tensor replaced:
- metadata and tokenizer: copied field by field, `general.file_type` set to the type most
  planned weights take and `general.quantized_by` to `allocator`;
- tensors: in the source's order; a planned one in its chosen type (its blocks as
  `profilers.quant.ggml.pack` lays them out, fp16 for an `fp16` choice), every other one as the
  source stores it, byte for byte;
- query and key rows of a `llama` GGUF in llama.cpp's rotary order: transformers undoes that
  permutation when it reads the file (and did when the model was loaded), so the writer applies
  it again to the planned rows (rows are stored independently, so this moves whole rows of blocks).

Its size is known before anything is quantized (`GgufSource.sizes`): the header (copied metadata
and the tensor table, whose entries do not depend on the types), then each tensor padded to the
file's alignment (a GGUF profile prices each choice at its padded bytes, `GgufSource.padded`).
A byte budget of a GGUF plan is a budget for this file, and the plan predicts its size exactly.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from profilers.quant.ggml.pack import pack_ggml
from profilers.types import ProfileTable

from ..errors import PlanError
from ..planning.plan import Plan
from .stored import StoredLayer

__all__ = ["GgufSizes", "GgufSource", "export_gguf"]

_FILE_TYPES = {  # the llama_ftype named after a type, for `general.file_type` (informational)
    "q8_0": "MOSTLY_Q8_0", "q6_k": "MOSTLY_Q6_K", "q5_k": "MOSTLY_Q5_K_M", "q5_1": "MOSTLY_Q5_1",
    "q5_0": "MOSTLY_Q5_0", "q4_k": "MOSTLY_Q4_K_M", "q4_1": "MOSTLY_Q4_1", "q4_0": "MOSTLY_Q4_0",
    "iq4_nl": "MOSTLY_IQ4_NL", "iq4_xs": "MOSTLY_IQ4_XS", "mxfp4": "MOSTLY_MXFP4_MOE", "q3_k": "MOSTLY_Q3_K_M",
    "q2_k": "MOSTLY_Q2_K", "q2_0": "MOSTLY_Q2_0", "fp16": "MOSTLY_F16",
}  # fmt: skip


@dataclass(frozen=True)
class GgufSizes:
    """Bytes of a GGUF file written from a source, in three parts.

    Attributes:
        fixed: the tensors copied from the source, each padded to the alignment.
        overhead: the header, padded to the alignment.
        planned: the planned tensors (layer names).
    """

    fixed: int
    overhead: int
    planned: tuple[str, ...]


class GgufSource:
    """A GGUF file a model was read from: its metadata, its tensors, and the model's parameter
    name of each tensor.

    Raises:
        PlanError: the file cannot be read, or the model's parameters cannot be matched to its
            tensors (an architecture gguf-py has no name map for).
    """

    def __init__(self, path: str | os.PathLike[str], model: nn.Module) -> None:
        from gguf import GGUFReader

        self.path = Path(path)
        try:
            self.reader = GGUFReader(self.path, "r")
        except Exception as e:
            raise PlanError(
                f"cannot read the source GGUF {self.path}: {e}; give the .gguf file the model was read from"
            ) from None
        self.arch = self._field("general.architecture")
        self.alignment = int(self._field("general.alignment") or 32)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.param_tensor = self._name_map(model)
        self.heads = (self._field(f"{self.arch}.attention.head_count"),
                      self._field(f"{self.arch}.attention.head_count_kv"))  # fmt: skip

    def _field(self, key: str) -> Any:
        field = self.reader.fields.get(key)
        return None if field is None else field.contents()

    def _name_map(self, model: nn.Module) -> dict[str, str]:
        """Parameter name -> tensor name, for the parameters the file holds (transformers' own map,
        the one it read the file with)."""
        from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

        try:
            gguf_to_param = get_gguf_hf_weights_map(model, TensorProcessor())
        except (NotImplementedError, AttributeError, KeyError) as e:
            raise PlanError(f"cannot match the model's parameters to the tensors of {self.path} ({e})") from None
        return {p: g for g, p in gguf_to_param.items() if g in self.tensors}

    def tensor_of(self, layer: str) -> str:
        """The tensor of a planned layer's weight (`layer.weight`)."""
        name = self.param_tensor.get(f"{layer}.weight")
        if name is None:
            raise PlanError(f"layer {layer!r} has no tensor in {self.path}; plan the model read from this file")
        return name

    def permuted(self, tensor: str) -> int | None:
        """The head count whose rotary permutation a tensor's rows take (llama's q and k), else None."""
        if self.arch != "llama" or None in self.heads:
            return None
        if ".attn_q." in tensor:
            return int(self.heads[0])
        if ".attn_k." in tensor:
            return int(self.heads[1])
        return None

    def sizes(self, planned: list[str]) -> GgufSizes:
        """File bytes of any plan of the `planned` layers, but their tensors (see `GgufSizes`)."""
        names = {self.tensor_of(layer) for layer in planned}
        with tempfile.TemporaryDirectory() as tmp:
            probe = Path(tmp) / "header.gguf"
            writer = self._writer(probe, {n: (self.tensors[n].data, self.tensors[n].tensor_type) for n in self.tensors},
                                  "fp16")  # fmt: skip
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            writer.close()
            header = probe.stat().st_size
        fixed = sum(self.padded(int(t.n_bytes)) for n, t in self.tensors.items() if n not in names)
        return GgufSizes(fixed=fixed, overhead=self.padded(header), planned=tuple(planned))

    def priced(self, table: ProfileTable) -> ProfileTable:
        """A profile of the model priced as this GGUF file: each option at its padded bytes, the
        tensors copied from the source as fixed bytes, the header as the file overhead."""
        sizes = self.sizes(table.names)
        layers = tuple(layer.model_copy(update={"options": tuple(o.model_copy(update={"bytes": self.padded(o.bytes)})
                                                                 for o in layer.options)})
                       for layer in table.layers)  # fmt: skip
        settings = {**table.settings, "format": "gguf", "gguf_source": str(self.path)}
        return table.model_copy(update={"layers": layers, "file_overhead": sizes.overhead, "fixed_bytes": sizes.fixed,
                                        "settings": settings})  # fmt: skip

    def padded(self, nbytes: int) -> int:
        """Bytes a tensor of `nbytes` takes in the file: its data padded to the alignment."""
        return -(-nbytes // self.alignment) * self.alignment

    def _writer(self, path: Path, data: dict[str, tuple[np.ndarray, Any]], file_type: str) -> Any:
        """A GGUFWriter holding the source's metadata and a tensor entry per tensor (source order)."""
        import gguf

        writer = gguf.GGUFWriter(path, self.arch)
        for field in self.reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue  # written by the writer itself
            vtype = field.types[0]
            value = field.contents()
            if field.name == gguf.Keys.General.FILE_TYPE and _FILE_TYPES[file_type] in gguf.LlamaFileType.__members__:
                value = int(gguf.LlamaFileType[_FILE_TYPES[file_type]])
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, value, vtype, sub_type=sub)
        writer.add_string(gguf.Keys.General.QUANTIZED_BY, "allocator")
        for name in self.tensors:
            array, qtype = data[name]
            writer.add_tensor_info(name, array.shape, array.dtype, array.nbytes, qtype)
        return writer

    def write(self, path: Path, replaced: dict[str, tuple[np.ndarray, Any]], file_type: str) -> Path:
        """The source with `replaced` tensors (name -> (data, type)), written atomically."""
        data = {n: replaced.get(n, (t.data, t.tensor_type)) for n, t in self.tensors.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            writer = self._writer(Path(tmp), data, file_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for name in self.tensors:
                writer.write_tensor_data(np.ascontiguousarray(data[name][0]), tensor_endianess=self.reader.endianess)
            writer.close()
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def _layer_data(name: str, layer: StoredLayer) -> tuple[np.ndarray, Any]:
    """A planned layer's tensor as the file stores it: its blocks' bytes `[rows, row bytes]` and
    its type, or fp16 values `[rows, cols]`."""
    import gguf

    if layer.ggml is not None:
        if not layer.ggml.type.available:
            raise PlanError(
                f"layer {name!r} takes {layer.ggml.type.gguf}, which the installed gguf package cannot write; install"
                " the gguf-py of a llama.cpp that has it, or solve without it (--types)"
            )
        return pack_ggml(layer.ggml), gguf.GGMLQuantizationType[layer.ggml.type.gguf]
    if layer.fp16 is not None:
        return layer.fp16.reshape(layer.matrix_shape).numpy().astype(np.float16), gguf.GGMLQuantizationType.F16
    raise PlanError(f"layer {name!r} takes {layer.choice.label}, which is not a GGUF type; solve with --format gguf")


def _rotary_order(rows: np.ndarray, heads: int) -> np.ndarray:
    """Rows `[n, ...]` in llama.cpp's rotary order (what transformers' reader undoes)."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def export_gguf(
    model: nn.Module, plan: Plan, path: str | os.PathLike[str], *, source: GgufSource, stored: dict[str, StoredLayer]
) -> Path:
    """Write the GGUF file of a plan of llama.cpp block types, atomically.

    Args:
        model: the model the plan was made for (read from `source`).
        plan: a GGUF plan (`Plan.target_format == "gguf"`).
        path: the `.gguf` file to write.
        source: the GGUF file the model was read from.
        stored: what quantizing the model by the plan stored per layer (`quantize_plan_`).

    Raises:
        PlanError: a plan of allocator's own format, a layer without a tensor in the source, or a
            tensor whose shape differs from the plan's.
    """
    if plan.target_format != "gguf":
        raise PlanError("this plan is of allocator's own format (int... choices); solve with --format gguf for a GGUF")
    replaced: dict[str, tuple[np.ndarray, Any]] = {}
    for name in plan.layers:
        tensor = source.tensor_of(name)
        data, qtype = _layer_data(name, stored[name])
        rows = int(source.tensors[tensor].shape[-1]) if len(source.tensors[tensor].shape) > 1 else 1
        if data.shape[0] != rows:
            raise PlanError(f"layer {name!r} has {data.shape[0]} rows but {tensor} in {source.path} has {rows}")
        heads = source.permuted(tensor)
        replaced[tensor] = (_rotary_order(data, heads) if heads else data, qtype)
    weights: Counter[str] = Counter()
    for lp in plan.layers.values():
        weights[lp.choice.label] += int(np.prod(lp.shape))
    return source.write(Path(path), replaced, file_type=weights.most_common(1)[0][0])
