"""GPTQ 4-bit checkpoints read into our int4 layout (int4/weight.py) without changing a single weight.

The on-disk format, as AutoGPTQ and GPTQModel write it and as their reference dequantization
reads it (sources read, 2026-11-26: AutoGPTQ/AutoGPTQ `auto_gptq/nn_modules/qlinear/
qlinear_cuda.py` @7c691ed and `qlinear_cuda_old.py` @179776b (`pack`, and the torch path of
`forward`), `auto_gptq/quantization/gptq.py` @5f891fa (`g_idx`); ModelCloud/GPTQModel
`gptqmodel/quantization/config.py` (config fields) and `gptqmodel/utils/model.py`
(`convert_gptq_v1_to_v2_format`); huggingface/text-generation-inference
`server/text_generation_server/utils/quantization.py` (where the config is found)):

- per linear layer `NAME.qweight` int32 [in / 8, out]: word r of column o holds input rows
  8r .. 8r+7 of output o, row 8r+k in bits 4k .. 4k+3 (k = 0 in the low nibble);
- `NAME.qzeros` int32 [groups, out / 8]: word c of group g holds the zero points of outputs
  8c .. 8c+7, output 8c+k in bits 4k .. 4k+3. Format "gptq" (v1, the default when the config
  names none) stores zero - 1 and every reader adds 1 back per nibble, so zeros run 1..16;
  "gptq_v2" stores the zero itself;
- `NAME.scales` fp16 [groups, out]; `NAME.g_idx` int32 [in]: the group of each input row
  (absent in some GPTQ-for-LLaMa files: then row i is in group i // group_size);
- the weight is `scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])`;
- the config: `quantize_config.json`, or `config.json`'s "quantization_config" (quant_method
  "gptq"; found by int4/checkpoints.py): bits, group_size (-1: one group per row),
  desc_act, sym, checkpoint_format.

Mapping onto `Int4Weight` (q * scale + offset, groups of G contiguous input columns): q stays q;
the packed bytes are the little-endian bytes of qweight transposed (byte b of a word holds rows
8r+2b and 8r+2b+1, low nibble first: our even column in the low nibble); scale = the fp16 scale;
offset = -zero * scale (`int4.from_zero_points`, shared with AWQ, says why this is exact): the
float32 reference reproduces every GPTQ weight bit for bit. G is the largest of our kernel's
group sizes (128, 64, 32) that divides GPTQ's group size and the fused product's rows (`group`):
a GPTQ group of 128 over G = 64 repeats its scale and offset twice, which changes no weight;
group_size -1 is one group per row, repeated the same way.

Not lossless, so refused: act order (desc_act) whose g_idx is not contiguous groups (each row
then has its own group order; contiguous groups need a branch made without act order, or
plain `--quantize int4` from the bf16 checkpoint), bits other than 4, group sizes no kernel size
divides (16), per-module overrides ("dynamic"), and other packings (marlin, bitblas). AWQ's
packing is awq.py's.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch

from chat.engine.int4 import weight as int4
from chat.engine.layout import Unsupported

PARTS = ("qweight", "qzeros", "scales", "g_idx")
FORMATS = ("gptq", "gptq_v2")
_NO_ACT_ORDER = (
    "use a branch made without act order (desc_act false, e.g. TheBloke's '...-actorder_False' "
    "branches), or --quantize int4 from the bf16 checkpoint"
)


@dataclass(frozen=True)
class GptqConfig:
    """A GPTQ checkpoint's quantization (a `CheckpointQuantization`, int4/checkpoints.py)."""

    bits: int
    group_size: int  # -1: one group per row
    desc_act: bool
    sym: bool
    checkpoint_format: str  # "gptq" (zero - 1 stored) or "gptq_v2"
    lm_head: bool  # whether lm_head is quantized too (GPTQModel's option)
    method: ClassVar[str] = "GPTQ"
    parts: ClassVar[tuple[str, ...]] = PARTS

    def group_of(self, module: str) -> int:
        return self.group_size

    def drops(self, name: str, tensor: torch.Tensor) -> bool:
        return False  # GPTQ adds no tensors beside its linear layers' own

    def to_int4(self, parts: dict[str, torch.Tensor], group: int, name: str = "") -> int4.Int4Weight:
        """One GPTQ linear layer (`PARTS` tensors) as an `Int4Weight` in groups of `group` columns,
        every weight unchanged (see the module docstring). Runs where the tensors are."""
        if sys.byteorder != "little":  # pragma: no cover - every CUDA host and CI runner is
            raise Unsupported("GPTQ weights are read as little-endian bytes")
        qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
        in_features, out_features = qweight.shape[0] * 8, qweight.shape[1]
        source = in_features if self.group_size == -1 else self.group_size
        groups = math.ceil(in_features / source)
        if (
            qweight.dtype != torch.int32
            or tuple(qzeros.shape) != (groups, out_features // 8)
            or tuple(scales.shape) != (groups, out_features)
            or in_features % group
            or source % group
        ):
            raise Unsupported(
                f"{name}: GPTQ tensors qweight {tuple(qweight.shape)} {qweight.dtype}, qzeros "
                f"{tuple(qzeros.shape)}, scales {tuple(scales.shape)} do not match 4-bit GPTQ in "
                f"groups of {source} (int4 groups of {group})"
            )
        rows = torch.arange(in_features, device=qweight.device)
        g_idx = parts.get("g_idx")
        if g_idx is not None and not torch.equal(g_idx.to(rows.dtype), rows // source):
            raise Unsupported(
                f"{name}: this GPTQ checkpoint uses act order (desc_act) with groups that are not "
                f"contiguous runs of columns, which int4's groups cannot hold without loss; {_NO_ACT_ORDER}"
            )
        packed = qweight.t().contiguous().view(torch.uint8)  # [out, in / 2], row 2c in the low nibble
        shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qzeros.device)
        zero = ((qzeros[..., None] >> shifts) & 15).reshape(groups, out_features)
        if self.checkpoint_format == "gptq":
            zero = zero + 1
        return int4.from_zero_points(packed, zero, scales, source, group)


def from_config(raw: dict) -> GptqConfig:
    """The GPTQ config from its fields (`raw`, keys lower-cased); `Unsupported` where the
    checkpoint does not map onto our int4 without loss (its group size: checked by the caller)."""
    if raw.get("is_marlin_format"):
        raise Unsupported("GPTQ checkpoint format 'marlin': gptq or gptq_v2 load")
    config = GptqConfig(
        bits=int(raw.get("bits", 4)),
        group_size=int(raw.get("group_size", -1)),
        desc_act=bool(raw.get("desc_act", False)),
        sym=bool(raw.get("sym", True)),
        checkpoint_format=str(raw.get("checkpoint_format") or "gptq").lower(),
        lm_head=bool(raw.get("lm_head", False)),
    )
    if config.bits != 4:
        raise Unsupported(f"GPTQ with {config.bits} bits: only 4-bit GPTQ checkpoints load into int4")
    if config.checkpoint_format not in FORMATS:
        raise Unsupported(f"GPTQ checkpoint format {config.checkpoint_format!r}: gptq or gptq_v2 load")
    if raw.get("dynamic"):
        raise Unsupported("GPTQ with per-module settings ('dynamic') is not supported")
    return config
