"""What the int4, GPTQ and AWQ checkpoint tests share: a folder laid out in int4 on the CPU with
its products read back (`load_int4`), the tiny Falcon written as a quantized checkpoint (each test
module packs its linear layers as its quantizer does), its layers cut back out of the int4
products, and greedy tokens of the fast path against transformers' `generate`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import torch

from chat.conversation.params import GenerationParams
from chat.engine.decode_loop import FastDecoder
from chat.engine.int4 import weight as int4
from chat.engine.int4.products import Int4Reference
from chat.engine.layout import Layout
from chat.engine.weights import CheckpointSource, lay_out

LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
LLAMA_LINEARS = tuple(f"self_attn.{x}_proj" for x in "qkvo") + (
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
GREEDY = GenerationParams(temperature=0.0, max_new_tokens=24)
PROMPT = "User: Plan a trip to Lisbon\nFalcon:"


@dataclass
class Int4Model:
    """A folder laid out in int4 (the float32 reference products) and its products as int4
    weights by layout name: "h.{i}.in", "h.{i}.mlp_in", "h.{i}.out", "h.{i}.mlp_out", "lm_head"."""

    config: object
    layout: Layout
    quantization: object  # the checkpoint's (GPTQ, AWQ, our saved int4) or None
    products: dict[str, int4.Int4Weight]


def load_int4(folder, save=None) -> Int4Model:
    """`folder` as `--quantize int4` lays it out on the CPU (float32), handing `save` (an
    `Int4Writer`) what it makes, as `--save-quantized` does."""
    source = CheckpointSource(folder, device="cpu", dtype=torch.float32)
    layout = lay_out(source, max_len=128, products=Int4Reference, quantize="hqq", save=save)
    if save is not None:
        save.finish(source.config, folder)
    products = {"lm_head": _as_int4(layout.lm_head)}
    for i, layer in enumerate(layout.layers):
        for name, packed in (
            ("in", layer.w_in),
            ("mlp_in", layer.w_mlp_in),
            ("out", layer.w_out),
            ("mlp_out", layer.w_mlp_out),
        ):
            if packed is not None:
                products[f"h.{i}.{name}"] = _as_int4(packed)
    return Int4Model(source.config, layout, source.quantization, products)


def _as_int4(packed: tuple) -> int4.Int4Weight:
    """`Int4Reference`'s kept tuple (levels, scale, offset, bias) as an int4 weight."""
    levels, scale, offset, _ = packed
    return int4.Int4Weight(levels, scale, offset, levels.shape[1] * 2 // scale.shape[1])


def hold_int4_layout(model, layout: Layout) -> None:
    """A transformers Llama `model` holding `layout`'s int4 weights (Int4Reference's), dequantized:
    the fused QKV's rows taken back out of their [kv, group + 2, head_dim] interleave, [gate | up]
    split, the head replaced (untied)."""
    config = model.config
    kv, d = config.num_key_value_heads, config.head_dim
    group = config.num_attention_heads // kv
    with torch.no_grad():
        for block, layer in zip(model.model.layers, layout.layers, strict=True):
            qkv = int4.dequantize(_as_int4(layer.w_in)).view(kv, group + 2, d, -1)
            attn, mlp = block.self_attn, block.mlp
            attn.q_proj.weight.copy_(qkv[:, :group].reshape(kv * group * d, -1))
            attn.k_proj.weight.copy_(qkv[:, group].reshape(kv * d, -1))
            attn.v_proj.weight.copy_(qkv[:, group + 1].reshape(kv * d, -1))
            attn.o_proj.weight.copy_(int4.dequantize(_as_int4(layer.w_out)))
            gate, up = int4.dequantize(_as_int4(layer.w_mlp_in)).chunk(2)
            mlp.gate_proj.weight.copy_(gate)
            mlp.up_proj.weight.copy_(up)
            mlp.down_proj.weight.copy_(int4.dequantize(_as_int4(layer.w_mlp_out)))
        model.lm_head.weight = torch.nn.Parameter(
            int4.dequantize(_as_int4(layout.lm_head)), requires_grad=False
        )


def write_checkpoint(
    folder,
    tiny_model_dir,
    quantization: dict,
    config_file: str,
    pack: Callable,
    shards=1,
    extra: dict | None = None,
):
    """The tiny Falcon in `folder` with its linear layers replaced by `pack(module, weight)`'s
    tensors (NAME.qweight, ...), everything else in fp16, and `extra` tensors; `quantization` in
    config.json's "quantization_config" or in `config_file`. Two shards split layer 0 across them
    (as large checkpoints' shards split layers). Returns the tensors."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    if config_file == "config.json":
        config["quantization_config"] = quantization
    else:
        (folder / config_file).write_text(json.dumps(quantization))
    config["dtype"] = "float16"
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {}
    with safe_open(str(tiny_model_dir / "model.safetensors"), framework="pt") as dense:
        for name in dense.keys():  # noqa: SIM118
            weight = dense.get_tensor(name)
            module = name.removesuffix(".weight")
            if module.endswith(LINEARS + LLAMA_LINEARS):
                tensors.update({f"{module}.{part}": t for part, t in pack(module, weight).items()})
            else:
                tensors[name] = weight.half()
    tensors.update(extra or {})
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return tensors
    first = {k: v for k, v in tensors.items() if k.startswith("transformer.h.0.")}
    first.pop(f"transformer.h.0.{LINEARS[3]}.scales")
    weight_map = {}
    for i, part in enumerate((first, {k: v for k, v in tensors.items() if k not in first})):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(part, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return tensors


def scaled_levels(q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """scale * (q - zero) [out, in] in float32 (exact there), as GPTQ and AWQ define their weights:
    q [out, in], zero and scale [groups, out] per `group` input columns."""
    per_column = torch.arange(q.shape[1]) // group
    return scale.float().t()[:, per_column] * (q - zero.t()[:, per_column]).float()


def split_layer(model, index: int, shapes: dict) -> dict[str, torch.Tensor]:
    """The four linear weights of layer `index` ([out, in] `shapes` by module) cut back out of
    the fused int4 products, in float32."""
    prefix = f"transformer.h.{index}."
    fused_in = int4.dequantize(model.products[f"h.{index}.in"])
    fused_out = int4.dequantize(model.products[f"h.{index}.out"])
    rows = shapes[prefix + LINEARS[0]][0]
    columns = shapes[prefix + LINEARS[1]][1]
    return {
        prefix + LINEARS[0]: fused_in[:rows],
        prefix + LINEARS[2]: fused_in[rows:],
        prefix + LINEARS[1]: fused_out[:, :columns],
        prefix + LINEARS[3]: fused_out[:, columns:],
    }


def assert_greedy_equals_generate(tiny_model_dir, tokenizer, model, weights: dict[str, torch.Tensor]):
    """transformers' Falcon holding `weights` (module -> float32 [out, in]), the checkpoint's fp16
    norms and embeddings and the int4 lm_head `model` has (the checkpoints leave it dense; we
    quantize it as from bf16), against the fast decoder over `model`'s layout in float32."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.copy_(parameter.half().float())  # the checkpoint's dense tensors are fp16
        for name, weight in weights.items():
            reference.get_submodule(name).weight.copy_(weight)
    lm_head = int4.dequantize(model.products["lm_head"])
    reference.lm_head.weight = torch.nn.Parameter(lm_head, requires_grad=False)
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.inference_mode():
        out = reference.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=GREEDY.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    expected = out[0, ids.shape[1] :].tolist()
    tokens = []
    FastDecoder.from_layout(model.layout, tokenizer.eos_token_id).generate(
        ids, GREEDY, 0, tokens.append, lambda: False
    )
    assert tokens == expected[: len(tokens)] and len(tokens) >= 8


def assert_serves_and_saves(folder, saved):
    """`--model folder --quantize int4 --save-quantized saved` streams a reply, and what it saved
    is our int4 (no quantization_config left) and loads as such."""
    from chat.config import Settings
    from chat.factory import build_backend

    backend = build_backend(Settings(model=str(folder), quantize="int4", save_quantized=str(saved)))
    try:
        assert "int4" in backend.name
        tokens = list(backend.stream(PROMPT, GenerationParams(temperature=0.0, max_new_tokens=8)))
        assert "".join(t.text for t in tokens).strip()
    finally:
        backend.close()
    assert "quantization_config" not in json.loads((saved / "config.json").read_text())
    assert load_int4(saved).quantization.method == "saved int4"
