"""Checkpoints that arrive already in 4 bits: which quantization a folder's config names, read into
one `CheckpointQuantization` (GPTQ: gptq.py, AWQ: awq.py) that the int4 loader (int4/loading.py)
asks the same questions of. Both map onto int4 through `int4.from_zero_points`, without loss.

Where the config is, as transformers and the quantizers look for it: config.json's
"quantization_config" first; else AutoGPTQ's quantize_config.json or AutoAWQ's quant_config.json
(neither has to name its method: AutoAWQ's has fields of its own, w_bit and q_group_size).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Protocol

import torch

from chat.engine.falcon_layout import Unsupported
from chat.engine.int4 import awq, gptq
from chat.engine.int4 import weight as int4

PARTS = tuple(dict.fromkeys(gptq.PARTS + awq.PARTS))  # every quantized linear layer's tensors
_READERS = {"gptq": gptq.from_config, "awq": awq.from_config}
_AWQ_FIELDS = ("zero_point", "w_bit", "q_group_size")


class CheckpointQuantization(Protocol):
    """What the loader needs of a quantized checkpoint's config (gptq.GptqConfig, awq.AwqConfig)."""

    method: str  # "GPTQ" or "AWQ", as messages name it
    group_size: int  # input columns per group; -1: one group per row

    def in_features(self, parts: dict[str, torch.Tensor]) -> int:
        """A quantized linear layer's input size, from its tensors."""

    def to_int4(self, parts: dict[str, torch.Tensor], group: int, name: str = "") -> int4.Int4Weight:
        """The layer as an `Int4Weight` in groups of `group` columns, every weight unchanged."""

    def drops(self, name: str, tensor: torch.Tensor) -> bool:
        """True for a tensor the quantizer added beside the model's own, checked to change
        nothing (else `Unsupported`), and not kept."""


def read(folder) -> CheckpointQuantization | None:
    """The quantization of the checkpoint in `folder`, None if it has none; `Unsupported` if it
    is quantized in a way that does not map onto our int4 without loss."""
    folder = Path(folder)
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


def _check_group_size(quantization: CheckpointQuantization) -> None:
    size = quantization.group_size
    if size != -1 and not any(size % g == 0 for g in int4.GROUP_SIZES):
        raise Unsupported(
            f"{quantization.method} group size {size}: the int4 kernel takes groups of "
            f"{'/'.join(map(str, int4.GROUP_SIZES))} columns (or multiples, or -1)"
        )


class Converter:
    """A linear layer's parts as an `Int4Weight` in the group size its fused product needs: a
    dense weight quantized (int4.quantize), a GPTQ or AWQ layer converted."""

    def __init__(self, search: str, quantization: CheckpointQuantization | None):
        self.search, self.quantization = search, quantization

    def in_features(self, parts: dict[str, torch.Tensor]) -> int:
        if "weight" in parts:
            return parts["weight"].shape[1]
        return self._quantization(parts).in_features(parts)

    def drops(self, name: str, tensor: torch.Tensor) -> bool:
        """A tensor the checkpoint's quantizer added, checked and not kept (awq.py's act scales)."""
        return self.quantization is not None and self.quantization.drops(name, tensor)

    def group(self, in_sizes: list[int]) -> int:
        """The largest kernel group dividing every fused part's columns (and the checkpoint's
        groups): groups must not straddle a seam between parts."""
        size = math.gcd(*in_sizes)
        if self.quantization is not None and self.quantization.group_size != -1:
            size = math.gcd(size, self.quantization.group_size)
        return int4.group_size_for(size)

    def __call__(self, parts: dict, in_sizes: list[int], name: str) -> int4.Int4Weight:
        group = self.group(in_sizes)
        if "weight" in parts:
            return int4.quantize(parts["weight"], group, search=self.search)
        return self._quantization(parts, name).to_int4(parts, group, name)

    def _quantization(self, parts: dict, name: str = "a linear layer"):
        if self.quantization is None:
            raise ValueError(f"{name} holds {sorted(parts)}, but the checkpoint names no quantization")
        return self.quantization
