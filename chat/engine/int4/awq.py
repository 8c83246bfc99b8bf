"""AutoAWQ 4-bit "GEMM" checkpoints read into our int4 layout (int4/weight.py) without changing a weight.

The on-disk format, as AutoAWQ writes it and as its reference dequantization and its CUDA kernel
read it (sources read, 2026-11-26: casper-hansen/AutoAWQ `awq/modules/linear/gemm.py` @d9dc8e5
(`WQLinear_GEMM`'s buffers and `from_linear`, the pack loop), `awq/utils/packing_utils.py`
@958d604 (`unpack_awq`, `reverse_awq_order`, `dequantize_gemm`), `awq/models/_config.py` @024d960
(quant_config.json's fields, `to_transformers_dict`), `awq/models/base.py` @93d7e8e
(`_load_quantized_modules`, `_scale_activations`), `awq/models/falcon.py` @88a299b
(`get_act_for_scaling`, `get_layers_for_scaling`); casper-hansen/AutoAWQ_kernels
`awq_ext/quantization/gemm_cuda_gen.cu` @16c5fe1; transformers 5.23 `AwqConfig` and `AwqFormat`
(`utils/quantization_config.py`) and `AWQ_SCALES_MAPPINGS` (`integrations/awq.py`)):

- per linear layer `NAME.qweight` int32 [in, out / 8]: word c of input row i holds outputs
  8c .. 8c+7, output 8c + ORDER[k] in bits 4k .. 4k+3, ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
  (`from_linear`'s order_map; `reverse_awq_order` undoes it);
- `NAME.qzeros` int32 [in / G, out / 8]: the zero points, packed the same way over outputs and
  stored as they are (0..15; no GPTQ-style zero - 1);
- `NAME.scales` fp16 [in / G, out]; the weight is `scales[i // G, o] * (q[i, o] - zero[i // G, o])`,
  which AutoAWQ computes in fp16 (`dequantize_gemm`; the kernel's `sub.f16x2`, `fma.rn.f16x2`): the
  exact value rounded once to fp16;
- the config: config.json's "quantization_config" (quant_method "awq": bits, group_size,
  zero_point, version, or `format` as transformers 5 writes it), or AutoAWQ's own
  quant_config.json (w_bit, q_group_size, zero_point, version "GEMM"; no quant_method), found by
  int4/checkpoints.py. modules_to_not_convert needs no reading: a layer left dense (lm_head,
  which AutoAWQ never quantizes) has a plain `weight`, quantized as a bf16 checkpoint's is;
- Falcon's `transformer.h.N.mlp.act.scales`: AutoAWQ's `ScaledActivation` (act(x) / scales before
  dense_4h_to_h), which its loader and transformers' (`AWQ_SCALES_MAPPINGS` names falcon) put on
  Falcon's activation, and which early AutoAWQ (2023: `_awq_quant` called `_scale_activations`)
  put on before saving. AutoAWQ's Falcon searches no scale for the activation
  (`get_layers_for_scaling` has no entry for it), so they are all 1.

Mapping onto `Int4Weight`: q stays q (unpacked, un-interleaved, two per byte with the even input
column in the low nibble); scale = the fp16 scale; offset = -zero * scale (`int4.from_zero_points`):
the float32 reference holds every weight as the exact `scale * (q - zero)`, which rounded to fp16
is AutoAWQ's weight bit for bit. G is chosen as for GPTQ (gptq.py).

Refused: versions other than "gemm" (gemv packs along the input axis, qweight [out, in / 8] with
padded zeros, and gemv_fast differently again; marlin, exllama and ipex are kernels' layouts we
do not read), llm-awq's own packing (no interleave), bits other than 4, zero_point
false (AutoAWQ's GEMM layer cannot be written without zero points: not a layout checked here),
group sizes no kernel size divides, and activation scales other than 1 (folding them into
dense_4h_to_h would change its int4 weights).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from chat.engine.int4 import weight as int4
from chat.engine.layout import Unsupported

PARTS = ("qweight", "qzeros", "scales")
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # bits 4k .. 4k+3 of a word hold output 8c + ORDER[k]
VERSIONS = ("gemm",)
_ACT_SCALES = re.compile(r"transformer\.h\.\d+\.mlp\.act\.scales$")
_LEVELS_PER_STEP = 1 << 26  # levels unpacked at a time: 64 MB of scratch on the GPU


@dataclass(frozen=True)
class AwqConfig:
    """An AWQ checkpoint's quantization (a `CheckpointQuantization`, int4/checkpoints.py)."""

    bits: int
    group_size: int  # -1: one group per row
    version: str
    method: ClassVar[str] = "AWQ"
    parts: ClassVar[tuple[str, ...]] = PARTS

    def group_of(self, module: str) -> int:
        return self.group_size

    def drops(self, name: str, tensor: torch.Tensor) -> bool:
        """True for Falcon's activation scales when all 1 (they then change nothing)."""
        if not _ACT_SCALES.match(name):
            return False
        if not bool((tensor == 1).all()):
            raise Unsupported(
                f"{name}: this AWQ checkpoint scales Falcon's MLP activation (scales other than 1); "
                "folding them into dense_4h_to_h would change its int4 weights"
            )
        return True

    def to_int4(self, parts: dict[str, torch.Tensor], group: int, name: str = "") -> int4.Int4Weight:
        """One AWQ linear layer (`PARTS` tensors) as an `Int4Weight` in groups of `group` columns,
        every weight unchanged (see the module docstring). Runs where the tensors are."""
        qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
        in_features, out_features = qweight.shape[0], qweight.shape[1] * 8
        source = in_features if self.group_size == -1 else self.group_size
        groups = math.ceil(in_features / source)
        if (
            qweight.dtype != torch.int32
            or qzeros.dtype != torch.int32
            or scales.dtype != torch.float16
            or tuple(qzeros.shape) != (groups, out_features // 8)
            or tuple(scales.shape) != (groups, out_features)
            or in_features % group
            or source % group
        ):
            raise Unsupported(
                f"{name}: AWQ tensors qweight {tuple(qweight.shape)} {qweight.dtype}, qzeros "
                f"{tuple(qzeros.shape)} {qzeros.dtype}, scales {tuple(scales.shape)} {scales.dtype} do "
                f"not match 4-bit AWQ GEMM in groups of {source} (int4 groups of {group})"
            )
        rows = max(2, _LEVELS_PER_STEP // out_features // 2 * 2)
        packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=qweight.device)
        for first in range(0, in_features, rows):
            levels = _by_output(qweight[first : first + rows])  # [rows, out]
            packed[:, first // 2 : (first + rows) // 2] = int4.pack(levels.t())
        return int4.from_zero_points(packed, _by_output(qzeros), scales, source, group)


def from_config(raw: dict) -> AwqConfig:
    """The AWQ config from its fields (`raw`, keys lower-cased; transformers' names or AutoAWQ's
    quant_config.json's); `Unsupported` where the checkpoint does not map onto int4 without loss
    (its group size: checked by the caller)."""
    bits = int(raw.get("bits", raw.get("w_bit", 4)))
    group_size = int(raw.get("group_size", raw.get("q_group_size", 128)))
    # transformers reads `version` over `format`; its backend "llm-awq" names llm-awq's packing.
    version = str(raw.get("version") or raw.get("format") or "gemm").lower()
    if str(raw.get("backend") or "").lower() == "llm-awq":
        version = "llm-awq"
    if version not in VERSIONS:
        raise Unsupported(
            f"AWQ version {version!r}: only 'gemm' checkpoints load into int4 (AutoAWQ's default, "
            "as TheBloke's AWQ uploads have it)"
        )
    if bits != 4:
        raise Unsupported(f"AWQ with {bits} bits: only 4-bit AWQ checkpoints load into int4")
    if not raw.get("zero_point", True):
        raise Unsupported(
            "AWQ without zero points (zero_point false): AutoAWQ's GEMM layers always have them; "
            "this layout was not checked"
        )
    return AwqConfig(bits=bits, group_size=group_size, version=version)


def _by_output(words: torch.Tensor) -> torch.Tensor:
    """int32 [rows, out / 8] packed in AWQ's order -> uint8 levels [rows, out], in output order."""
    levels = torch.empty(*words.shape, 8, dtype=torch.uint8, device=words.device)
    for k, position in enumerate(ORDER):
        levels[..., position] = (words >> (4 * k)) & 15
    return levels.flatten(-2)
