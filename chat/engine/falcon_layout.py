"""A Falcon's weights laid out for the fast decoder, and the layer step as plain torch functions.

Falcon's parallel attention lets each layer run as two matrix products: the attention's fused
QKV and the MLP's first layer read the same normed input, and `dense(attn) + mlp(h)` is one
product of `[attn | gelu(h)]` with the two output weights side by side, the residual added to
it. The model's own modules are pointed at views of those fused weights, so memory does not
grow and the plain path still works. Each product's weights are kept as a `products` adapter
packed them and multiplied by its `linear` (products.py): dense, int4 or a rank's slice.

Falcon's fused QKV is `[kv_heads, group queries + key + value, head_dim]` in every layout
(multi-query 7B: one KV head; 40B/180B: 8 KV heads; old multi-head: group 1). The layout's
`kv_heads` and `group` are what this process holds: all of them on one GPU.

The functions below are what torch.compile sees (decode_loop.py compiles them): tensors and
tuples of tensors in, no Python state, so one compiled graph serves every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chat.engine.products import Dense, Products, whole


class Unsupported(Exception):
    """This model cannot take the fast path; the message says why."""


def check_supported(model) -> None:
    """Raise `Unsupported` unless this is a rotary, parallel-attention Falcon on one device."""
    config = model.config
    check_config(config)
    if getattr(model, "is_quantized", False) or getattr(config, "quantization_config", None):
        raise Unsupported("quantized weights are not supported")
    params = list(model.parameters())
    devices = {p.device for p in params}
    if len(devices) != 1:
        raise Unsupported(f"model spans {len(devices)} devices")
    if {p.dtype for p in params} - {torch.float32, torch.bfloat16, torch.float16}:
        raise Unsupported("weights are not float32, bfloat16 or float16")


def check_config(config) -> None:
    """Raise `Unsupported` unless the config is a rotary, parallel-attention Falcon."""
    if getattr(config, "model_type", None) != "falcon":
        raise Unsupported(f"model type {getattr(config, 'model_type', '?')!r} is not Falcon")
    if config.alibi:
        raise Unsupported("ALiBi Falcon models are not supported")
    if not (config.parallel_attn or config.new_decoder_architecture):
        raise Unsupported("sequential (non-parallel) attention is not supported")
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope != "default":
        raise Unsupported(f"rope scaling {rope!r} is not supported")


@dataclass
class Layer:
    """One decoder layer's weights, laid out for two matrix products (see the module docstring)."""

    ln_attn: tuple  # (weight, bias, eps) of the norm before attention (and the MLP, if shared)
    ln_mlp: tuple | None  # separate MLP norm (new decoder architecture with two norms)
    w_in: tuple  # packed [qkv | h_to_4h] rows when the norm is shared, else only qkv
    w_mlp_in: tuple | None  # packed h_to_4h when the MLP has its own norm
    w_out: tuple  # packed [dense | 4h_to_h] side by side: [hidden, attention + ffn]
    k_cache: torch.Tensor  # [kv_heads, max_len, head_dim]
    v_cache: torch.Tensor

    def norms(self) -> tuple:
        return (*self.ln_attn, *(self.ln_mlp or (None, None, 0.0)))


@dataclass
class FalconLayout:
    """Everything the decode step reads: weights, KV caches, rotary tables, and their sizes."""

    embed: torch.Tensor  # [vocab, hidden], the whole table (one row is read per token)
    ln_f: tuple
    lm_head: tuple  # packed [vocab (this process's rows), hidden]
    layers: list[Layer]
    cos: torch.Tensor  # [max_len, head_dim], the model's dtype
    sin: torch.Tensor
    products: type[Products]
    hidden: int
    kv_heads: int  # KV heads this process holds
    group: int  # queries per KV head
    head_dim: int
    ffn: int  # MLP width this process holds
    vocab: int  # the whole vocabulary
    max_len: int

    @property
    def qkv_size(self) -> int:
        return self.kv_heads * (self.group + 2) * self.head_dim

    @property
    def attention_size(self) -> int:
        return self.kv_heads * self.group * self.head_dim

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype


def layout_from_model(model, *, max_len: int, products: type[Products] = Dense) -> FalconLayout:
    """The fast decoder's layout of a transformers Falcon on one device (see `check_supported`)."""
    check_supported(model)
    config = model.config
    transformer = model.transformer
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    kv_heads = config.num_kv_heads if config.new_decoder_architecture or not config.multi_query else 1
    embed = transformer.word_embeddings.weight.detach()
    device, dtype = embed.device, embed.dtype
    two_norms = config.new_decoder_architecture and config.num_ln_in_parallel_attn == 2
    with torch.no_grad():
        layers = [_fuse(block, two_norms, kv_heads, head_dim, max_len, products) for block in transformer.h]
        cos, sin = rotary_tables(transformer.rotary_emb, max_len, device, dtype)
    return FalconLayout(
        embed=embed,
        ln_f=_norm(transformer.ln_f),
        lm_head=products.pack(model.lm_head.weight.detach(), None),
        layers=layers,
        cos=cos,
        sin=sin,
        products=products,
        hidden=config.hidden_size,
        kv_heads=kv_heads,
        group=heads // kv_heads,
        head_dim=head_dim,
        ffn=transformer.h[0].mlp.dense_h_to_4h.weight.shape[0],
        vocab=model.lm_head.weight.shape[0],
        max_len=int(max_len),
    )


def rotary_tables(rotary, max_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin `[max_len, head_dim]` as transformers makes them: float32 angles, then cast."""
    inv_freq = rotary.inv_freq.to(device=device, dtype=torch.float32)
    angles = torch.arange(max_len, device=device, dtype=torch.float32)[:, None] * inv_freq
    table = torch.cat((angles, angles), dim=-1)
    scaling = getattr(rotary, "attention_scaling", 1.0)
    return (table.cos() * scaling).to(dtype), (table.sin() * scaling).to(dtype)


def _fuse(block, two_norms: bool, kv_heads, head_dim, max_len, products) -> Layer:
    attn, mlp = block.self_attention, block.mlp
    qkv, h4 = attn.query_key_value, mlp.dense_h_to_4h
    dense, h4h = attn.dense, mlp.dense_4h_to_h
    if two_norms:
        ln_attn, ln_mlp = _norm(block.ln_attn), _norm(block.ln_mlp)
        w_in = products.pack(qkv.weight.detach(), _detach(qkv.bias))
        w_mlp_in = products.pack(h4.weight.detach(), _detach(h4.bias))
    else:
        ln_attn, ln_mlp = _norm(block.input_layernorm), None
        b_in = torch.cat([qkv.bias, h4.bias]).detach() if qkv.bias is not None else None
        w_in = products.pack(_fuse_rows(qkv, h4), b_in)
        w_mlp_in = None
    b_out = (dense.bias + h4h.bias).detach() if dense.bias is not None else None
    w_out = products.pack(_fuse_columns(dense, h4h), b_out)
    weight = qkv.weight
    cache = torch.zeros(kv_heads, max_len, head_dim, dtype=weight.dtype, device=weight.device)
    return Layer(ln_attn, ln_mlp, w_in, w_mlp_in, w_out, cache, cache.clone())


def _norm(layer_norm) -> tuple:
    return (layer_norm.weight.detach(), _detach(layer_norm.bias), float(layer_norm.eps))


def _detach(tensor):
    return None if tensor is None else tensor.detach()


def _fuse_rows(first, second) -> torch.Tensor:
    """One [out1 + out2, in] weight; the two modules are pointed at its row slices."""
    fused = torch.cat([first.weight.detach(), second.weight.detach()], dim=0)
    rows = first.weight.shape[0]
    first.weight.data, second.weight.data = fused[:rows], fused[rows:]
    return fused


def _fuse_columns(first, second) -> torch.Tensor:
    """One [out, in1 + in2] weight; the two modules are pointed at its column slices."""
    fused = torch.cat([first.weight.detach(), second.weight.detach()], dim=1)
    columns = first.weight.shape[1]
    first.weight.data, second.weight.data = fused[:, :columns], fused[:, columns:]
    return fused


# -- the layer step, as plain functions (what torch.compile sees) ----------------------------------


def project_in(x, ln_w, ln_b, eps, ln2_w, ln2_b, eps2, w_in, w_mlp_in, qkv_size: int, linear):
    """Normed input through QKV and the MLP's first layer: (qkv, h)."""
    normed = F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps)
    if w_mlp_in is None:  # one norm feeds both: one product
        fused = linear(normed, *w_in)
        return fused[..., :qkv_size], fused[..., qkv_size:]
    normed_mlp = F.layer_norm(x, (x.shape[-1],), ln2_w, ln2_b, eps2)
    return linear(normed, *w_in), linear(normed_mlp, *w_mlp_in)


def split_rotate(qkv, cos, sin, kv_heads, group, head_dim):
    """Falcon's fused QKV is [kv_heads, group queries + key + value, head_dim] for every layout."""
    qkv = qkv.view(qkv.shape[0], kv_heads, group + 2, head_dim)
    q, k, v = qkv[:, :, :group], qkv[:, :, group], qkv[:, :, group + 1]
    q = rotate(q, cos[:, None, None], sin[:, None, None])
    k = rotate(k, cos[:, None], sin[:, None])
    return q, k, v  # [T, kv, group, d], [T, kv, d], [T, kv, d]


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def join(attn, h):
    """The out-projection's input: attention output and GELU(h) side by side."""
    return torch.cat((attn, F.gelu(h)), dim=-1)


def project_out(x, joined, w_out, linear, reduce):
    """x + dense(attn) + 4h_to_h(gelu(h)), as one product over the two inputs side by side.

    `reduce` completes a product over a slice of `joined` (products.py); on one device it is
    `whole` and Inductor fuses the residual add into the product's reduction.
    """
    return x + reduce(linear(joined, *w_out))


# One decode layer is three pieces: the input side (`decode_in`; on a GPU the compiled
# `project_in` and decode_attention's rotary kernel), attention, the out-projection. The
# boundaries make Inductor write GELU(h) to memory once: inside one graph it recomputed it in
# the next reduction for every output row (GELU 4,544 times on Falcon-7B). torch's fused
# attention calls run one block per KV head for one query position (31 us a layer on the H100
# for Falcon-7B's single KV head): hence decode_attention's kernels.


def decode_in(
    x,
    ln_w,
    ln_b,
    eps,
    ln2_w,
    ln2_b,
    eps2,
    w_in,
    w_mlp_in,
    linear,
    k_cache,
    v_cache,
    cos,
    sin,
    pos,
    joined,
    kv_heads: int,
    group: int,
    head_dim: int,
):
    """Project, rotate, write the cache at `pos` and GELU(h) after the attention part of `joined`.

    Returns the rotated queries [kv_heads, group, head_dim], for attention to fill the rest.
    """
    qkv, h = project_in(
        x, ln_w, ln_b, eps, ln2_w, ln2_b, eps2, w_in, w_mlp_in, (kv_heads * (group + 2)) * head_dim, linear
    )
    q, k, v = split_rotate(qkv, cos, sin, kv_heads, group, head_dim)
    k_cache[:, pos] = k.transpose(0, 1)
    v_cache[:, pos] = v.transpose(0, 1)
    joined[:, kv_heads * group * head_dim :] = F.gelu(h)
    return q[0].contiguous()


def prefill_layer(x, layer: Layer, layout: FalconLayout, cos, sin, reduce=whole):
    """One layer over the whole prompt (eager): causal attention over the prompt's own keys."""
    t, kv_heads, group, head_dim = x.shape[0], layout.kv_heads, layout.group, layout.head_dim
    linear = layout.products.linear
    qkv, h = project_in(x, *layer.norms(), layer.w_in, layer.w_mlp_in, layout.qkv_size, linear)
    q, k, v = split_rotate(qkv, cos, sin, kv_heads, group, head_dim)
    layer.k_cache[:, :t] = k.transpose(0, 1)
    layer.v_cache[:, :t] = v.transpose(0, 1)
    q = q.permute(1, 2, 0, 3).reshape(1, kv_heads * group, t, head_dim)
    k = k.transpose(0, 1)[None].repeat_interleave(group, dim=1)
    v = v.transpose(0, 1)[None].repeat_interleave(group, dim=1)
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    attn = attn[0].transpose(0, 1).reshape(t, -1)
    return project_out(x, join(attn, h), layer.w_out, linear, reduce)


def logits(x, ln_f, lm_head, linear, gather):
    """The last position's logits over the whole vocabulary, in float32."""
    normed = F.layer_norm(x, (x.shape[-1],), ln_f[0], ln_f[1], ln_f[2])
    return gather(linear(normed, *lm_head))[-1].float()
