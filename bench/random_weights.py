"""Seeded random weights of a real model's shape, as a source for the engine's layout builder.

Benchmarks measure shapes nobody downloads here (Falcon-7B/40B/180B, Falcon3-7B/10B): this
source answers `chat/engine/weights.py`'s questions with tensors drawn from a seed on the device,
so every rank of a tensor-parallel run and every run holds the same model. Norms are ones, biases
zeros. With `int4=True` the products' weights are drawn directly in int4 at the shape and group
the builder asks for (quantizing Falcon-180B's bf16 would take many minutes); the embedding stays
dense, and a tied head is drawn as its own weight.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

# The linear layers whose weights are products (both families), and the head.
PRODUCTS = (
    ".query_key_value.",
    ".dense.",
    ".dense_h_to_4h.",
    ".dense_4h_to_h.",
    "_proj.",
)


class RandomSource:
    """See the module docstring; `config` is a transformers config (Falcon or Llama)."""

    quantization = None

    def __init__(self, config, device, dtype, seed: int = 0, int4: bool = False):
        from transformers import AutoModelForCausalLM

        self.config, self.device, self.dtype, self.seed, self.int4 = (
            config,
            torch.device(device),
            dtype,
            seed,
            int4,
        )
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config)
        self._shapes = {name: tuple(t.shape) for name, t in meta.state_dict().items()}
        if config.tie_word_embeddings and not int4:  # the head is the embedding, as in a checkpoint
            self._shapes.pop("lm_head.weight", None)

    def has(self, name: str) -> bool:
        return name in self._shapes

    def quantized(self, name: str) -> bool:
        return self.int4 and is_product_weight(name)

    def read(self, name: str, rows=None, columns=None) -> torch.Tensor:
        shape = self._shapes[name]
        if name.endswith("norm.weight") or ".ln_" in name:
            whole = torch.ones(shape, device=self.device, dtype=self.dtype)
        elif name.endswith(".bias"):
            whole = torch.zeros(shape, device=self.device, dtype=self.dtype)
        else:
            whole = torch.empty(shape, device=self.device, dtype=self.dtype)
            whole.normal_(0.0, self.config.initializer_range, generator=self._generator(name))
        if rows is not None:
            return torch.cat([whole[r.start : r.stop] for r in rows])
        if columns is not None:
            return torch.cat([whole[:, c.start : c.stop] for c in columns], dim=1)
        return whole

    def read_int4(self, name: str, rows, columns, group: int):
        """Random levels and scales of the asked slice's shape, drawn directly in int4."""
        from chat.engine.int4.weight import Int4Weight

        out_features, in_features = self._shapes[name]
        if rows is not None:
            out_features = sum(len(r) for r in rows)
        if columns is not None:
            in_features = sum(len(c) for c in columns)
        generator = self._generator(f"{name}{rows}{columns}")
        packed = torch.randint(
            0,
            256,
            (out_features, in_features // 2),
            dtype=torch.uint8,
            device=self.device,
            generator=generator,
        )
        scale = torch.rand(out_features, in_features // group, device=self.device, generator=generator)
        scale = scale.add_(0.5).mul_(0.002)
        return Int4Weight(packed, scale.to(self.dtype), (-8 * scale).to(self.dtype), group)

    def _generator(self, name: str):
        # zlib.crc32: the same in every process (Python's hash() is salted).
        return torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))


def is_product_weight(name: str) -> bool:
    return name == "lm_head.weight" or (name.endswith(".weight") and any(part in name for part in PRODUCTS))


@dataclass(frozen=True)
class RandomWeights:
    """`RandomSource` as a picklable description (tensor-parallel ranks open it themselves)."""

    config: dict  # a transformers config's to_dict(), model_type included
    seed: int = 0
    int4: bool = False

    def open(self, device, dtype) -> RandomSource:
        from transformers import AutoConfig

        config = dict(self.config)
        model_type = config.pop("model_type")
        return RandomSource(AutoConfig.for_model(model_type, **config), device, dtype, self.seed, self.int4)
