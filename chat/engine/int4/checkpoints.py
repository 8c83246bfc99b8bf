"""Checkpoints that arrive already in 4 bits: which quantization a folder's config names, read into
one `CheckpointQuantization` (GPTQ: gptq.py, AWQ: awq.py; our own saved int4: saved.py) that the
layout builder (weights.py) asks the same questions of. GPTQ and AWQ map onto int4 through
`int4.from_zero_points`, without loss.

Where the config is, as transformers and the quantizers look for it: config.json's
"quantization_config" first; else AutoGPTQ's quantize_config.json or AutoAWQ's quant_config.json
(neither has to name its method: AutoAWQ's has fields of its own, w_bit and q_group_size).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch

from chat.engine.int4 import awq, gptq
from chat.engine.int4 import weight as int4
from chat.engine.layout import Unsupported

_READERS = {"gptq": gptq.from_config, "awq": awq.from_config}
_AWQ_FIELDS = ("zero_point", "w_bit", "q_group_size")


class CheckpointQuantization(Protocol):
    """What the loader needs of a quantized checkpoint's config (gptq.GptqConfig, awq.AwqConfig)."""

    method: str  # "GPTQ" or "AWQ", as messages name it
    parts: tuple[str, ...]  # a quantized linear layer's tensors, NAME.part; the first always there

    def group_of(self, module: str) -> int:
        """The input columns per group of a quantized linear layer; -1: one group per row."""

    def to_int4(self, parts: dict[str, torch.Tensor], group: int, name: str = "") -> int4.Int4Weight:
        """The layer as an `Int4Weight` in groups of `group` columns, every weight unchanged."""

    def drops(self, name: str, tensor: torch.Tensor) -> bool:
        """True for a tensor the quantizer added beside the model's own, checked to change
        nothing (else `Unsupported`), and not kept."""


def read(folder) -> CheckpointQuantization | None:
    """The quantization of the checkpoint in `folder`, None if it has none; `Unsupported` if it
    is quantized in a way that does not map onto our int4 without loss. A folder `--save-quantized`
    wrote is one too (int4/saved.py)."""
    from chat.engine.int4 import saved

    folder = Path(folder)
    if saved.is_saved(folder):
        return saved.read(folder)
    for file_name in ("config.json", "quantize_config.json", "quant_config.json"):
        path = folder / file_name
        if not path.exists():
            continue
        raw = json.loads(path.read_text())
        if file_name == "config.json":
            raw = raw.get("quantization_config")
        if raw is None:
            continue
        raw = {str(key).lower(): value for key, value in raw.items()}
        named = file_name == "quant_config.json" or any(field in raw for field in _AWQ_FIELDS)
        method = str(raw.get("quant_method") or ("awq" if named else "gptq")).lower()
        if method not in _READERS:
            raise Unsupported(
                f"the checkpoint is quantized with {method!r}; --quantize int4 loads GPTQ or AWQ "
                "4-bit checkpoints or quantizes bf16/fp16 ones"
            )
        quantization = _READERS[method](raw)
        _check_group_size(quantization)
        return quantization
    return None


def _check_group_size(quantization) -> None:
    size = quantization.group_size
    if size != -1 and not any(size % g == 0 for g in int4.GROUP_SIZES):
        raise Unsupported(
            f"{quantization.method} group size {size}: the int4 kernel takes groups of "
            f"{'/'.join(map(str, int4.GROUP_SIZES))} columns (or multiples, or -1)"
        )
