"""What differs between the model families the fast decoder runs, in one place: Falcon and Llama.

For each: which configs it takes (else `Unsupported`, naming the field), its sizes (`Shape`), its
norm and activation, its rotary tables, and where each layer's weights are in a checkpoint and
how they join into the layout's products (`LayerRecipe`). Everything else (the layout builder,
weights.py; the decode loop; sampling; attention; the products adapters; tensor parallelism) is
shared.

- Falcon (transformers' `FalconForCausalLM`: 7B/40B/180B): LayerNorm with bias, GELU, a fused
  QKV already in the layout's `[kv, group + 2, head_dim]` order, attention and MLP in parallel.
- Llama (`LlamaForCausalLM`: Falcon3, SmolLM2, Llama 2/3, TinyLlama...): RMSNorm, SwiGLU
  (`silu(gate) * up`), separate q, k, v projections interleaved per KV head into the fused order
  (any group count), sequential attention then MLP, rotary with its own theta and the rope
  scalings whose tables do not change with the length (default, linear, llama3, yarn).

Both: tied or untied heads, biases where the config has them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chat.engine.layout import Unsupported

Ranges = list[range]

# Rope types whose tables are fixed once made: `dynamic` and `longrope` change them with the
# sequence length as it grows, which one static table cannot follow.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class Shape:
    """The sizes that decide the layout."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layers: int
    eps: float
    ffn: int = 0  # the MLP's width
    parallel: bool = True  # attention and MLP side by side (Falcon)
    two_norms: bool = False  # parallel with a norm of its own for the MLP (Falcon 40B/180B)
    tied: bool = False  # the head is the embedding table

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class Part:
    """Rows or columns of one weight (None: all of them), and its bias's name if it has one."""

    name: str
    rows: Ranges | None = None
    columns: Ranges | None = None
    bias: str | None = None


@dataclass(frozen=True)
class Product:
    """Weights joined into one product: by rows (axis 0: outputs stacked; their biases joined the
    same way) or side by side along their inputs (axis 1: one output; the biases summed)."""

    parts: tuple[Part, ...]
    axis: int = 0


@dataclass(frozen=True)
class LayerRecipe:
    """Where one layer's norms and products come from (the `Layer` fields of the same names)."""

    ln_attn: str  # the norm's name without ".weight"
    ln_mlp: str | None
    w_in: Product
    w_mlp_in: Product | None
    w_out: Product
    w_mlp_out: Product | None


def layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rms_norm(x, weight, bias, eps):
    """transformers' LlamaRMSNorm: the statistics in float32, the weight applied in x's dtype."""
    wide = x.float()
    normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def swiglu(h):
    """Llama's MLP activation of `[gate | up]`: silu(gate) * up."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_type(config) -> str:
    return (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")


def check_rope(config) -> None:
    kind = rope_type(config)
    if kind not in STATIC_ROPE:
        raise Unsupported(
            f"rope scaling {kind!r} (config.json's rope_scaling) changes with the sequence length; "
            f"the fast decoder takes {', '.join(STATIC_ROPE)}"
        )


class Falcon:
    """transformers' Falcon: rotary, parallel attention (see the module docstring)."""

    name = "falcon"
    norm = staticmethod(layer_norm)
    act = staticmethod(F.gelu)
    embed = "transformer.word_embeddings.weight"
    final_norm = "transformer.ln_f"

    @staticmethod
    def check(config) -> None:
        if config.alibi:
            raise Unsupported("ALiBi Falcon models are not supported")
        if not (config.parallel_attn or config.new_decoder_architecture):
            raise Unsupported("sequential (non-parallel) attention is not supported")
        if getattr(config, "activation", "gelu") != "gelu":
            raise Unsupported(f"activation {config.activation!r} is not supported (GELU is)")
        check_rope(config)

    @staticmethod
    def shape(config) -> Shape:
        heads = config.num_attention_heads
        new = config.new_decoder_architecture
        kv = config.num_kv_heads if new or not config.multi_query else 1
        return Shape(
            hidden=config.hidden_size,
            heads=heads,
            kv_heads=kv,
            head_dim=config.hidden_size // heads,
            vocab=config.vocab_size,
            layers=config.num_hidden_layers,
            eps=config.layer_norm_epsilon,
            ffn=getattr(config, "ffn_hidden_size", None) or 4 * config.hidden_size,
            parallel=True,
            # transformers' FalconDecoderLayer: a new-architecture config that names no count has two.
            two_norms=bool(new and (config.num_ln_in_parallel_attn or 2) == 2),
            tied=bool(config.tie_word_embeddings),
        )

    @staticmethod
    def rotary(config):
        from transformers.models.falcon.modeling_falcon import FalconRotaryEmbedding

        return FalconRotaryEmbedding(config)

    @staticmethod
    def layer(i: int, shape: Shape, plan, ffn: Ranges) -> LayerRecipe:
        p = f"transformer.h.{i}."
        qkv = Part(
            p + "self_attention.query_key_value.weight",
            rows=plan.qkv_rows,
            bias=_bias(p, "self_attention.query_key_value"),
        )
        h4 = Part(p + "mlp.dense_h_to_4h.weight", rows=ffn, bias=_bias(p, "mlp.dense_h_to_4h"))
        dense = Part(
            p + "self_attention.dense.weight",
            columns=plan.attention_columns,
            bias=_bias(p, "self_attention.dense"),
        )
        h4h = Part(p + "mlp.dense_4h_to_h.weight", columns=ffn, bias=_bias(p, "mlp.dense_4h_to_h"))
        out = Product((dense, h4h), axis=1)
        if shape.two_norms:
            return LayerRecipe(p + "ln_attn", p + "ln_mlp", Product((qkv,)), Product((h4,)), out, None)
        return LayerRecipe(p + "input_layernorm", None, Product((qkv, h4)), None, out, None)


class Llama:
    """transformers' Llama: RMSNorm, SwiGLU, grouped-query attention (see the module docstring)."""

    name = "llama"
    norm = staticmethod(rms_norm)
    act = staticmethod(swiglu)
    embed = "model.embed_tokens.weight"
    final_norm = "model.norm"

    @staticmethod
    def check(config) -> None:
        if config.hidden_act != "silu":
            raise Unsupported(f"hidden_act {config.hidden_act!r} is not supported (silu is)")
        if getattr(config, "pretraining_tp", 1) not in (1, None):
            raise Unsupported(f"pretraining_tp {config.pretraining_tp} is not supported")
        check_rope(config)

    @staticmethod
    def shape(config) -> Shape:
        heads = config.num_attention_heads
        return Shape(
            hidden=config.hidden_size,
            heads=heads,
            kv_heads=config.num_key_value_heads or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab=config.vocab_size,
            layers=config.num_hidden_layers,
            eps=config.rms_norm_eps,
            ffn=config.intermediate_size,
            parallel=False,
            two_norms=True,
            tied=bool(config.tie_word_embeddings),
        )

    @staticmethod
    def rotary(config):
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        return LlamaRotaryEmbedding(config)

    @staticmethod
    def layer(i: int, shape: Shape, plan, ffn: Ranges) -> LayerRecipe:
        p = f"model.layers.{i}."
        d, group = shape.head_dim, shape.group
        q, k, v = (p + f"self_attn.{x}_proj" for x in "qkv")
        qkv = []
        for head in plan.kv_heads:  # interleaved into [kv, group + 2, d]: this head's queries, key, value
            queries = range((head * group + plan.queries.start) * d, (head * group + plan.queries.stop) * d)
            kv_rows = [range(head * d, (head + 1) * d)]
            qkv += [
                Part(q + ".weight", rows=[queries], bias=q + ".bias"),
                Part(k + ".weight", rows=kv_rows, bias=k + ".bias"),
                Part(v + ".weight", rows=kv_rows, bias=v + ".bias"),
            ]
        o = Part(
            p + "self_attn.o_proj.weight", columns=plan.attention_columns, bias=p + "self_attn.o_proj.bias"
        )
        gate = Part(p + "mlp.gate_proj.weight", rows=ffn, bias=p + "mlp.gate_proj.bias")
        up = Part(p + "mlp.up_proj.weight", rows=ffn, bias=p + "mlp.up_proj.bias")
        down = Part(p + "mlp.down_proj.weight", columns=ffn, bias=p + "mlp.down_proj.bias")
        return LayerRecipe(
            p + "input_layernorm",
            p + "post_attention_layernorm",
            Product(tuple(qkv)),
            Product((gate, up)),
            Product((o,), axis=1),
            Product((down,), axis=1),
        )


def _bias(prefix: str, module: str) -> str:
    return f"{prefix}{module}.bias"


FAMILIES = {"falcon": Falcon, "llama": Llama}


def family_of(config):
    """The family of `config` (checked), or `Unsupported` naming what is not taken."""
    kind = getattr(config, "model_type", None)
    family = FAMILIES.get(kind)
    if family is None:
        raise Unsupported(f"model type {kind!r} is not one the fast decoder runs ({', '.join(FAMILIES)})")
    family.check(config)
    return family
