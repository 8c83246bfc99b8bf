"""A model's weights laid out for the fast decoder, and the layer step as plain torch functions.

One layout serves both families the decoder runs (families.py says how each is read):
- Falcon (parallel attention): attention and MLP read the same normed input, so a layer is two
  matrix products: the input side `[qkv | mlp-in]` (or the two apart, where the MLP has its own
  norm) and one out-product over `[attention | act(h)]`, the two output weights side by side, the
  residual added once;
- Llama (Falcon3, SmolLM2, Llama 3...; sequential): attention (qkv, then its out-product and the
  residual), then the MLP on the updated input with its own norm (`[gate | up]`, SwiGLU, down).

Either way the fused QKV is `[kv_heads, group queries + key + value, head_dim]` (Falcon stores it
so; Llama's q, k and v are interleaved into it while loading), so splitting, rotary, the cache
writes and attention are one code path for every group count. The layout's `kv_heads` and
`group` are what this process holds: all of them on one GPU.

Each product's weights are kept as a `products` adapter packed them and multiplied by its
`linear` (products.py): dense, int4 or a rank's slice. The norm and the activation are the
layout's `norm` and `act` (families.py), handed to the functions below like `linear`.

The functions below are what torch.compile sees (decode_loop.py compiles them): tensors, tuples of
tensors and those functions in, no Python state, so one compiled graph serves every layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chat.engine.products import Products, whole


class Unsupported(Exception):
    """This model cannot take the fast path; the message says why."""


@dataclass
class Layer:
    """One decoder layer's weights, laid out for its products (see the module docstring)."""

    ln_attn: tuple  # (weight, bias or None, eps) of the norm before attention (and a shared MLP)
    ln_mlp: tuple | None  # the MLP's own norm (Falcon's two-norm layout; Llama's second norm)
    w_in: tuple  # [qkv | mlp-in] rows where one norm feeds both, else qkv
    w_mlp_in: tuple | None  # the MLP's first product where it has its own norm
    w_out: tuple  # parallel: [attention-out | mlp-out] side by side; sequential: attention-out
    w_mlp_out: tuple | None  # sequential: the MLP's out-product
    k_cache: torch.Tensor  # [kv_heads, max_len, head_dim]
    v_cache: torch.Tensor

    def norms(self) -> tuple:
        return (*self.ln_attn, *(self.ln_mlp or (None, None, 0.0)))


@dataclass
class Layout:
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
    parallel: bool = True  # Falcon's attention and MLP side by side (see the module docstring)
    norm: Callable = None  # (x, weight, bias, eps) -> normed x
    act: Callable = F.gelu  # the MLP's activation of its first product's output
    family: str = "falcon"

    @property
    def qkv_size(self) -> int:
        return self.kv_heads * (self.group + 2) * self.head_dim

    @property
    def attention_size(self) -> int:
        return self.kv_heads * self.group * self.head_dim

    @property
    def joined_size(self) -> int:
        """The out-product's input: the attention output, and act(h) beside it where parallel."""
        return self.attention_size + (self.ffn if self.parallel else 0)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def beside(self, layer: Layer):
        """The MLP's first product where it runs beside attention (parallel), else None."""
        return layer.w_mlp_in if self.parallel else None


def rotary_tables(rotary, max_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin `[max_len, head_dim]` as transformers makes them: float32 angles, then cast."""
    inv_freq = rotary.inv_freq.to(device=device, dtype=torch.float32)
    angles = torch.arange(max_len, device=device, dtype=torch.float32)[:, None] * inv_freq
    table = torch.cat((angles, angles), dim=-1)
    scaling = getattr(rotary, "attention_scaling", 1.0)
    return (table.cos() * scaling).to(dtype), (table.sin() * scaling).to(dtype)


# -- the layer step, as plain functions (what torch.compile sees) ----------------------------------


def project_in(x, ln_w, ln_b, eps, ln2_w, ln2_b, eps2, w_in, w_mlp_in, qkv_size: int, linear, norm):
    """The normed input through QKV, and through the MLP's first product where it runs beside
    attention: (qkv, h), h None where it does not (sequential layers: `mlp_in` after attention)."""
    normed = norm(x, ln_w, ln_b, eps)
    fused = linear(normed, *w_in)
    if fused.shape[-1] == qkv_size:  # only QKV: the MLP has its own product (or comes after)
        if w_mlp_in is None:
            return fused, None
        return fused, linear(norm(x, ln2_w, ln2_b, eps2), *w_mlp_in)
    return fused[..., :qkv_size], fused[..., qkv_size:]  # one norm feeds both: one product


def split_rotate(qkv, cos, sin, kv_heads, group, head_dim):
    """The fused QKV is [kv_heads, group queries + key + value, head_dim] in every layout."""
    qkv = qkv.view(qkv.shape[0], kv_heads, group + 2, head_dim)
    q, k, v = qkv[:, :, :group], qkv[:, :, group], qkv[:, :, group + 1]
    q = rotate(q, cos[:, None, None], sin[:, None, None])
    k = rotate(k, cos[:, None], sin[:, None])
    return q, k, v  # [T, kv, group, d], [T, kv, d], [T, kv, d]


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def project_out(x, joined, w_out, linear, reduce):
    """x + the out-product of `joined` (parallel: dense(attn) + 4h_to_h(gelu(h)) as one product
    over the two inputs side by side; sequential: the attention's or the MLP's out-product).

    `reduce` completes a product over a slice of `joined` (products.py); on one device it is
    `whole` and Inductor fuses the residual add into the product's reduction.
    """
    return x + reduce(linear(joined, *w_out))


def mlp_in(x, ln_w, ln_b, eps, w_mlp_in, linear, norm, act):
    """A sequential layer's MLP input side: act(first product of the normed x), for `project_out`."""
    return act(linear(norm(x, ln_w, ln_b, eps), *w_mlp_in))


# One decode layer is three pieces (four where sequential): the input side (`decode_in`; on a GPU
# the compiled `project_in` and attention.py's rotary kernel), attention, the out-product (and the
# MLP: `mlp_in`, then `project_out` again). The boundaries make Inductor write act(h) to memory
# once: inside one graph it recomputed it in the next reduction for every output row (GELU 4,544
# times on Falcon-7B). torch's fused attention calls run one block per KV head for one query
# position (31 us a layer on the H100 for Falcon-7B's single KV head): hence attention.py's kernels.


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
    norm,
    act,
    k_cache,
    v_cache,
    cos,
    sin,
    rows,
    joined,
    kv_heads: int,
    group: int,
    head_dim: int,
):
    """Project T rows (one token, or a speculative verify step's), rotate them, write their keys
    and values at cache positions `rows` [T], and act(h) after the attention part of `joined`
    [T, ...] (where the MLP runs beside attention). cos and sin: the rows' [T, head_dim].

    Returns the rotated queries [T, kv_heads, group, head_dim], for attention to fill the rest.
    """
    qkv_size = kv_heads * (group + 2) * head_dim
    qkv, h = project_in(x, ln_w, ln_b, eps, ln2_w, ln2_b, eps2, w_in, w_mlp_in, qkv_size, linear, norm)
    q, k, v = split_rotate(qkv, cos, sin, kv_heads, group, head_dim)
    k_cache.index_copy_(1, rows, k.transpose(0, 1))
    v_cache.index_copy_(1, rows, v.transpose(0, 1))
    if h is not None:
        joined[:, kv_heads * group * head_dim :] = act(h)
    return q


def prefill_layer(x, layer: Layer, layout: Layout, cos, sin, reduce=whole):
    """One layer over the whole prompt (eager): causal attention over the prompt's own keys."""
    t, kv_heads, group, head_dim = x.shape[0], layout.kv_heads, layout.group, layout.head_dim
    linear, norm = layout.products.linear, layout.norm
    qkv, h = project_in(x, *layer.norms(), layer.w_in, layout.beside(layer), layout.qkv_size, linear, norm)
    q, k, v = split_rotate(qkv, cos, sin, kv_heads, group, head_dim)
    layer.k_cache[:, :t] = k.transpose(0, 1)
    layer.v_cache[:, :t] = v.transpose(0, 1)
    q = q.permute(1, 2, 0, 3).reshape(1, kv_heads * group, t, head_dim)
    k = k.transpose(0, 1)[None].repeat_interleave(group, dim=1)
    v = v.transpose(0, 1)[None].repeat_interleave(group, dim=1)
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    attn = attn[0].transpose(0, 1).reshape(t, -1)
    if layout.parallel:
        return project_out(x, torch.cat((attn, layout.act(h)), dim=-1), layer.w_out, linear, reduce)
    x = project_out(x, attn, layer.w_out, linear, reduce)
    hidden = mlp_in(x, *layer.ln_mlp, layer.w_mlp_in, linear, norm, layout.act)
    return project_out(x, hidden, layer.w_mlp_out, linear, reduce)


def logits(x, ln_f, lm_head, linear, gather, norm):
    """The last position's logits over the whole vocabulary, in float32."""
    return gather(linear(norm(x, *ln_f), *lm_head))[-1].float()
