"""A Falcon in int4 for the fast decoder: quantized while loading, shard by shard, or reloaded.

`--quantize int4` reads the checkpoint's safetensors shards one at a time onto the device; a
layer's four linear weights are fused as the fast decoder lays them out (falcon_layout.py) and
quantized (int4.py) as soon as the last of them has arrived, then the bf16 copies are dropped.
Peak memory is the int4 model plus about one shard and one layer, never the bf16 model (357 GB
for Falcon-180B). Norms, biases and the embedding table stay in the model's dtype.

`--save-quantized DIR` writes the int4 weights (int4.save) with the config and tokenizer files,
so `--model DIR --quantize int4` starts without the bf16 checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import int4
from .falcon_layout import FalconLayout, Layer, check_config, rotary_tables

log = logging.getLogger(__name__)

_LAYER_WEIGHT = re.compile(
    r"transformer\.h\.(\d+)\.(self_attention\.query_key_value|self_attention\.dense|"
    r"mlp\.dense_h_to_4h|mlp\.dense_4h_to_h)\.weight$"
)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


@dataclass
class Int4Falcon:
    """A Falcon's weights for the fast decoder: fused int4 products and dense tensors by name."""

    config: object  # transformers FalconConfig
    products: dict[str, int4.Int4Weight]  # "h.{i}.in", "h.{i}.mlp_in", "h.{i}.out", "lm_head"
    dense: dict[str, torch.Tensor]  # checkpoint names: embeddings, norms, fused biases
    stats: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        dense = sum(t.numel() * t.element_size() for t in self.dense.values())
        return dense + sum(w.nbytes for w in self.products.values())


def load_int4(folder, *, device, dtype=torch.bfloat16, search: str = "hqq") -> Int4Falcon:
    """The model in `folder` (safetensors, or a folder `save_int4` wrote) as int4 on `device`."""
    from transformers import AutoConfig

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    check_config(config)
    if int4.is_saved(folder):
        start = time.perf_counter()
        products, dense, _ = int4.load(folder, device)
        return Int4Falcon(config, products, dense, {"load_s": time.perf_counter() - start, "source": "int4"})
    return quantize_checkpoint(folder, config, device=device, dtype=dtype, search=search)


def quantize_checkpoint(folder: Path, config, *, device, dtype, search: str = "hqq") -> Int4Falcon:
    """Read the shards one by one onto `device`, quantizing each layer once it is complete."""
    from safetensors import safe_open

    index = Path(folder) / "model.safetensors.index.json"
    if index.exists():  # the shards it names (a folder may also hold a consolidated copy)
        files = [
            Path(folder) / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))
        ]
    else:
        files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no .safetensors files to quantize")
    two_norms = _two_norms(config)
    start = time.perf_counter()
    model = Int4Falcon(config, {}, {})
    pending: dict[int, dict[str, torch.Tensor]] = {}
    lm_head = None
    for path in files:
        with safe_open(str(path), framework="pt", device=str(device)) as shard:
            for name in shard.keys():  # noqa: SIM118 (safe_open is not iterable)
                tensor = shard.get_tensor(name)
                tensor = tensor.to(dtype) if tensor.is_floating_point() else tensor
                name = name.removeprefix("model.") if name.startswith("model.transformer.") else name
                match = _LAYER_WEIGHT.match(name)
                if match:
                    index = int(match.group(1))
                    pending.setdefault(index, {})[match.group(2)] = tensor
                    if len(pending[index]) == 4:
                        _quantize_layer(model, index, pending.pop(index), two_norms, search)
                elif name == "lm_head.weight":
                    lm_head = tensor
                else:
                    model.dense[name] = tensor
        if device != "cpu" and torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    if pending:
        raise ValueError(f"{folder}: layers {sorted(pending)} lack some of their linear weights")
    if lm_head is None:  # tied to the input embeddings (the embedding itself stays dense)
        lm_head = model.dense["transformer.word_embeddings.weight"]
    model.products["lm_head"] = int4.quantize(lm_head, search=search)
    _fuse_biases(model, config, two_norms)
    model.stats.update(source="quantized while loading", quantize_load_s=time.perf_counter() - start)
    return model


def _two_norms(config) -> bool:
    # transformers' FalconDecoderLayer: a new-architecture config that names no count has two.
    return bool(config.new_decoder_architecture and (config.num_ln_in_parallel_attn or 2) == 2)


def _quantize_layer(model: Int4Falcon, index: int, weights: dict, two_norms: bool, search: str) -> None:
    qkv, dense = weights["self_attention.query_key_value"], weights["self_attention.dense"]
    h4, h4h = weights["mlp.dense_h_to_4h"], weights["mlp.dense_4h_to_h"]
    prefix = f"h.{index}"
    if two_norms:
        model.products[f"{prefix}.in"] = int4.quantize(qkv, search=search)
        model.products[f"{prefix}.mlp_in"] = int4.quantize(h4, search=search)
    else:
        model.products[f"{prefix}.in"] = int4.quantize(torch.cat([qkv, h4]), search=search)
    # Groups must not straddle the seam between the two out-projections.
    group = int4.group_size_for(math.gcd(dense.shape[1], h4h.shape[1]))
    model.products[f"{prefix}.out"] = int4.quantize(torch.cat([dense, h4h], dim=1), group, search=search)


def _fuse_biases(model: Int4Falcon, config, two_norms: bool) -> None:
    dense = model.dense
    for i in range(config.num_hidden_layers):
        p = f"transformer.h.{i}"
        qkv_b, h4_b = (
            dense.pop(f"{p}.self_attention.query_key_value.bias", None),
            dense.pop(f"{p}.mlp.dense_h_to_4h.bias", None),
        )
        out_b, h4h_b = (
            dense.pop(f"{p}.self_attention.dense.bias", None),
            dense.pop(f"{p}.mlp.dense_4h_to_h.bias", None),
        )
        if qkv_b is not None:
            if two_norms:
                dense[f"h.{i}.in.bias"], dense[f"h.{i}.mlp_in.bias"] = qkv_b, h4_b
            else:
                dense[f"h.{i}.in.bias"] = torch.cat([qkv_b, h4_b])
            dense[f"h.{i}.out.bias"] = out_b + h4h_b


def save_int4(model: Int4Falcon, folder, source_folder) -> None:
    """Write `model` (int4.save) with the config and tokenizer, as a folder `--model` can load."""
    folder = Path(folder)
    int4.save(model.products, model.dense, folder, {"model_type": "falcon"})
    model.config.save_pretrained(folder)
    for name in _TOKENIZER_FILES:
        if (Path(source_folder) / name).exists():
            shutil.copy(Path(source_folder) / name, folder / name)


def layout_from_int4(model: Int4Falcon, *, max_len: int, products) -> FalconLayout:
    """The fast decoder's layout, each int4 product repacked for `products` (int4_products.py).

    Consumes `model.products` as it goes, so the int4 weights are never held twice.
    """
    from transformers.models.falcon.modeling_falcon import FalconRotaryEmbedding

    config, dense = model.config, model.dense
    embed = dense["transformer.word_embeddings.weight"]
    device, dtype = embed.device, embed.dtype
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    kv_heads = config.num_kv_heads if config.new_decoder_architecture or not config.multi_query else 1
    two_norms = _two_norms(config)

    def norm(name):
        eps = config.layer_norm_epsilon
        return (dense[f"{name}.weight"], dense.get(f"{name}.bias"), float(eps))

    def take(name):
        weight = model.products.pop(name)
        return products.from_int4(weight, dense.get(f"{name}.bias"))

    ffn = model.products["h.0.out"].shape[1] - config.hidden_size  # out-projection: [attn | ffn]
    layers = []
    for i in range(config.num_hidden_layers):
        p = f"transformer.h.{i}"
        if two_norms:
            ln_attn, ln_mlp = norm(f"{p}.ln_attn"), norm(f"{p}.ln_mlp")
            w_mlp_in = take(f"h.{i}.mlp_in")
        else:
            ln_attn, ln_mlp, w_mlp_in = norm(f"{p}.input_layernorm"), None, None
        cache = torch.zeros(kv_heads, max_len, head_dim, dtype=dtype, device=device)
        layers.append(
            Layer(ln_attn, ln_mlp, take(f"h.{i}.in"), w_mlp_in, take(f"h.{i}.out"), cache, cache.clone())
        )
    lm_head = model.products.pop("lm_head")
    rotary = FalconRotaryEmbedding(config)
    cos, sin = rotary_tables(rotary, max_len, device, dtype)
    return FalconLayout(
        embed=embed,
        ln_f=norm("transformer.ln_f"),
        lm_head=products.from_int4(lm_head, None),
        layers=layers,
        cos=cos,
        sin=sin,
        products=products,
        hidden=config.hidden_size,
        kv_heads=kv_heads,
        group=heads // kv_heads,
        head_dim=head_dim,
        ffn=ffn,
        vocab=lm_head.shape[0],
        max_len=int(max_len),
    )
