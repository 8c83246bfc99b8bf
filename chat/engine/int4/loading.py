"""A Falcon in int4 for the fast decoder: quantized while loading, shard by shard, or reloaded.

`--quantize int4` reads the checkpoint's safetensors shards one at a time onto the device; a
layer's four linear weights are fused as the fast decoder lays them out (falcon_layout.py) and
quantized (int4/weight.py) as soon as the last of them has arrived, then the bf16 copies are dropped.
Peak memory is the int4 model plus about one shard and one layer, never the bf16 model (357 GB
for Falcon-180B). Norms, biases and the embedding table stay in the model's dtype.

A GPTQ or AWQ 4-bit checkpoint (int4/checkpoints.py) goes the same way, each of its
quantized linear layers converted instead of quantized, with no weight changed (lm_head, which
both leave dense, is quantized as above).

`--save-quantized DIR` writes the int4 weights (int4.save) with the config and tokenizer files,
so `--model DIR --quantize int4` starts without the bf16 checkpoint.
"""

from __future__ import annotations

import copy
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chat.engine.checkpoint import Checkpoint
from chat.engine.falcon_layout import FalconLayout, Layer, check_config, rotary_tables
from chat.engine.int4 import checkpoints as checkpoint_quantization
from chat.engine.int4 import weight as int4

log = logging.getLogger(__name__)

_LAYER_MODULES = (
    "self_attention.query_key_value",
    "self_attention.dense",
    "mlp.dense_h_to_4h",
    "mlp.dense_4h_to_h",
)
# A linear layer's tensors: (module, layer index or None for lm_head, part)
_LINEAR = re.compile(
    r"((?:transformer\.h\.(\d+)\.(?:" + "|".join(m.replace(".", r"\.") for m in _LAYER_MODULES) + r"))"
    r"|lm_head)\.(weight|" + "|".join(checkpoint_quantization.PARTS) + r")$"
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
    """The model in `folder` (safetensors in bf16/fp16, GPTQ or AWQ 4-bit, or a folder `save_int4`
    wrote) as int4 on `device`."""
    from transformers import AutoConfig

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)  # refuse, never ask on stdin
    check_config(config)
    if int4.is_saved(folder):
        start = time.perf_counter()
        products, dense, _ = int4.load(folder, device)
        return Int4Falcon(config, products, dense, {"load_s": time.perf_counter() - start, "source": "int4"})
    quantization = checkpoint_quantization.read(folder)
    return quantize_checkpoint(
        folder, config, device=device, dtype=dtype, search=search, quantization=quantization
    )


def quantize_checkpoint(
    folder: Path,
    config,
    *,
    device,
    dtype,
    search: str = "hqq",
    quantization: checkpoint_quantization.CheckpointQuantization | None = None,
) -> Int4Falcon:
    """Read the shards one by one onto `device`; once a layer's four linear layers are complete,
    fuse them into int4 products: a dense weight quantized, a GPTQ or AWQ one converted."""
    checkpoint = Checkpoint(folder)
    expected = _linear_parts(checkpoint)  # module -> the parts the checkpoint holds for it
    two_norms = _two_norms(config)
    start = time.perf_counter()
    model = Int4Falcon(config, {}, {})
    linears: dict[str, dict[str, torch.Tensor]] = {}
    to_int4 = checkpoint_quantization.Converter(search, quantization)
    for path in checkpoint.files:
        for name in checkpoint.names_in(path):
            tensor = checkpoint.read(name, device=device)
            match = _LINEAR.match(name)
            if match is None:
                if not to_int4.drops(name, tensor):
                    model.dense[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
                continue
            module, part = match.group(1), match.group(3)
            linears.setdefault(module, {})[part] = tensor.to(dtype) if part == "weight" else tensor
            index = match.group(2)
            if index is not None:
                names = [f"transformer.h.{index}.{m}" for m in _LAYER_MODULES]
                if all(n in expected and linears.get(n, {}).keys() == expected[n] for n in names):
                    parts = {m: linears.pop(n) for m, n in zip(_LAYER_MODULES, names, strict=True)}
                    _fuse_layer(model, int(index), parts, two_norms, to_int4)
        if device != "cpu" and torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    lm_head = linears.pop("lm_head", None)
    if linears:
        raise ValueError(f"{folder}: {sorted(linears)[:4]} lack some of their tensors")
    if lm_head is None:  # tied to the input embeddings (the embedding itself stays dense)
        lm_head = {"weight": model.dense["transformer.word_embeddings.weight"]}
    model.products["lm_head"] = to_int4(lm_head, [to_int4.in_features(lm_head)], "lm_head")
    _fuse_biases(model, config, two_norms)
    source = (
        f"{quantization.method} checkpoint, converted without loss"
        if quantization
        else "quantized while loading"
    )
    model.stats.update(source=source, quantize_load_s=time.perf_counter() - start)
    return model


def _linear_parts(checkpoint: Checkpoint) -> dict[str, set[str]]:
    """Each linear layer's parts in the checkpoint ("weight", or GPTQ's/AWQ's qweight, ...), from
    the shards' headers: a layer is complete when all of its parts have arrived."""
    parts: dict[str, set[str]] = {}
    for name in checkpoint.names():
        match = _LINEAR.match(name)
        if match:
            parts.setdefault(match.group(1), set()).add(match.group(3))
    return parts


def _two_norms(config) -> bool:
    # transformers' FalconDecoderLayer: a new-architecture config that names no count has two.
    return bool(config.new_decoder_architecture and (config.num_ln_in_parallel_attn or 2) == 2)


def _fuse_layer(
    model: Int4Falcon, index: int, parts: dict, two_norms: bool, to_int4: checkpoint_quantization.Converter
) -> None:
    """The layer's products as the fast decoder lays them out (falcon_layout.py): the input-side
    weights stacked by rows ([qkv | h_to_4h] when the norm is shared), the out-projections side by
    side along their inputs ([dense | 4h_to_h]). Joining int4 weights changes none of them."""
    qkv, dense = parts["self_attention.query_key_value"], parts["self_attention.dense"]
    h4, h4h = parts["mlp.dense_h_to_4h"], parts["mlp.dense_4h_to_h"]
    prefix = f"h.{index}"
    hidden = [to_int4.in_features(qkv)]
    if two_norms:
        model.products[f"{prefix}.in"] = to_int4(qkv, hidden, f"{prefix}.qkv")
        model.products[f"{prefix}.mlp_in"] = to_int4(h4, hidden, f"{prefix}.mlp_in")
    else:
        inputs = [to_int4(qkv, hidden, f"{prefix}.qkv"), to_int4(h4, hidden, f"{prefix}.mlp_in")]
        model.products[f"{prefix}.in"] = int4.concat(inputs, dim=0)
    seams = [to_int4.in_features(dense), to_int4.in_features(h4h)]
    outputs = [to_int4(dense, seams, f"{prefix}.dense"), to_int4(h4h, seams, f"{prefix}.4h_to_h")]
    model.products[f"{prefix}.out"] = int4.concat(outputs, dim=1)


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
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # a GPTQ/AWQ source's: the saved weights are ours
        del config.quantization_config
    config.save_pretrained(folder)
    for name in _TOKENIZER_FILES:
        if (Path(source_folder) / name).exists():
            shutil.copy(Path(source_folder) / name, folder / name)


def layout_from_int4(model: Int4Falcon, *, max_len: int, products) -> FalconLayout:
    """The fast decoder's layout, each int4 product repacked for `products` (int4/products.py).

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
