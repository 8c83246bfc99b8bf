"""A lean Falcon decode loop: static KV cache, one CUDA graph per token, sampling on the GPU.

At batch 1 a token costs one read of every weight; `generate` spends several times that on
Python and kernel launches. Here the one-token step is a few plain torch functions (gpt-fast's
shape: `_prefill`, `_step`, `_choose`), compiled (two pieces per layer, one for the head) around
a flash-decoding attention kernel (decode_attention.py), and captured once in a CUDA graph that
reads the token and its position from GPU tensors, so replaying it is the whole step.
README.md, Performance, has the measurements.

Falcon's parallel attention lets each layer run as two matrix products: the attention's fused
QKV and the MLP's first layer read the same normed input, and `dense(attn) + mlp(h)` is one
product of `[attn | gelu(h)]` with the two output weights side by side, the residual added to
it. The model's own modules are pointed at views of those fused weights, so memory does not
grow and the plain path still works. One-row products compiled with coordinate-descent tuning
become Triton reductions that read the weights at the copy bandwidth (cuBLAS's GEMV: 87%).

On the CPU (float32) the same functions run eagerly, without graphs: CI checks the logic there.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..params import GenerationParams
from .base import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP
from .decode_attention import FlashDecode, attend_reference

log = logging.getLogger(__name__)

# "default" (Inductor, no autotuning), "max-autotune-no-cudagraphs", or "off" (eager kernels).
COMPILE_MODE = os.environ.get("FAST_DECODE_COMPILE", "default")
# One-token step on a GPU: "flash" (decode_attention's Triton kernels) or "torch" (the torch
# code the CPU runs, compiled by Inductor; its attention reads the whole cache; kept to compare).
ATTENTION = os.environ.get("FAST_DECODE_ATTENTION", "flash")


class Unsupported(Exception):
    """This model cannot take the fast path; the message says why."""


@dataclass
class _Layer:
    """One decoder layer's weights, laid out for two matrix products (see the module docstring)."""

    ln_attn: tuple  # (weight, bias, eps) of the norm before attention (and the MLP, if shared)
    ln_mlp: tuple | None  # separate MLP norm (new decoder architecture with two norms)
    w_in: torch.Tensor  # [qkv | h_to_4h] rows when the norm is shared, else only qkv
    b_in: torch.Tensor | None
    w_mlp_in: torch.Tensor | None  # h_to_4h when the MLP has its own norm
    b_mlp_in: torch.Tensor | None
    w_out: torch.Tensor  # [dense | 4h_to_h] side by side: [hidden, hidden + ffn]
    b_out: torch.Tensor | None
    k_cache: torch.Tensor  # [kv_heads, max_len, head_dim]
    v_cache: torch.Tensor


def check_supported(model) -> None:
    """Raise `Unsupported` unless this is a rotary, parallel-attention Falcon on one device."""
    config = model.config
    if getattr(config, "model_type", None) != "falcon":
        raise Unsupported(f"model type {getattr(config, 'model_type', '?')!r} is not Falcon")
    if config.alibi:
        raise Unsupported("ALiBi Falcon models are not supported")
    if not (config.parallel_attn or config.new_decoder_architecture):
        raise Unsupported("sequential (non-parallel) attention is not supported")
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope != "default":
        raise Unsupported(f"rope scaling {rope!r} is not supported")
    if getattr(model, "is_quantized", False) or getattr(config, "quantization_config", None):
        raise Unsupported("quantized weights are not supported")
    params = list(model.parameters())
    devices = {p.device for p in params}
    if len(devices) != 1:
        raise Unsupported(f"model spans {len(devices)} devices")
    if {p.dtype for p in params} - {torch.float32, torch.bfloat16, torch.float16}:
        raise Unsupported("weights are not float32, bfloat16 or float16")


class FastDecoder:
    """Static-cache Falcon decoder; CUDA-graph replay on a GPU, eager on the CPU."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_len: int,
        use_graphs: bool | None = None,
        compile_mode: str | None = None,
    ):
        check_supported(model)
        config = model.config
        self.model = model
        self.eos_token_id = tokenizer.eos_token_id
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self.compile_mode = compile_mode or COMPILE_MODE
        self.name = "fast (CUDA graphs)" if self.use_graphs else "fast (eager)"
        self.max_len = int(max_len)
        self.hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden // self.num_heads
        if config.new_decoder_architecture or not config.multi_query:
            self.kv_heads = config.num_kv_heads
        else:
            self.kv_heads = 1
        self.group = self.num_heads // self.kv_heads
        self.vocab = model.lm_head.weight.shape[0]
        self.ready = not self.use_graphs
        self._graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self._fallback = None  # the plain decoder, once capture has failed
        # The step's pieces; compiled in warm_up on a GPU.
        self._project_in, self._decode_in, self._attend_torch, self._project_out, self._head = (
            _project_in,
            _decode_in,
            attend_reference,
            _project_out,
            _head,
        )
        self._tokenizer = tokenizer
        with torch.no_grad():
            self._build(model)

    # -- set-up ------------------------------------------------------------------------------

    def _build(self, model) -> None:
        config, dev, dt = model.config, self.device, self.dtype
        transformer = model.transformer
        self.embed = transformer.word_embeddings.weight
        self.ln_f = _norm(transformer.ln_f)
        self.lm_head = model.lm_head.weight
        self.layers = [self._fuse(block, config) for block in transformer.h]
        # The out-projection's input [attention | GELU(h)], rewritten by every layer of the step.
        self.joined = torch.empty(1, self.layers[0].w_out.shape[1], dtype=dt, device=dev)
        self.flash = None
        if dev.type == "cuda" and ATTENTION == "flash":
            self.flash = FlashDecode(self.kv_heads, self.group, self.head_dim, self.max_len, dev, dt)

        # Rotary tables as transformers makes them: float32 angles, cast to the model's dtype.
        rotary = transformer.rotary_emb
        inv_freq = rotary.inv_freq.to(device=dev, dtype=torch.float32)
        angles = torch.arange(self.max_len, device=dev, dtype=torch.float32)[:, None] * inv_freq
        table = torch.cat((angles, angles), dim=-1)
        scaling = getattr(rotary, "attention_scaling", 1.0)
        self.cos = (table.cos() * scaling).to(dt)
        self.sin = (table.sin() * scaling).to(dt)

        # Per-generation state the captured step reads and writes in place.
        self.history = torch.zeros(self.max_len + 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.seen = torch.zeros(self.vocab, dtype=torch.bool, device=dev)
        self.positions = torch.arange(self.max_len, device=dev)
        self.knobs = _Knobs(dev)
        self._not_last = torch.ones(self.vocab, dtype=torch.bool, device=dev)
        self._not_last[-1] = False  # top-p always keeps the most likely token

    def _fuse(self, block, config) -> _Layer:
        attn, mlp = block.self_attention, block.mlp
        two_norms = config.new_decoder_architecture and config.num_ln_in_parallel_attn == 2
        qkv, h4 = attn.query_key_value, mlp.dense_h_to_4h
        dense, h4h = attn.dense, mlp.dense_4h_to_h
        if two_norms:
            ln_attn, ln_mlp = _norm(block.ln_attn), _norm(block.ln_mlp)
            w_in, b_in = qkv.weight.detach(), _detach(qkv.bias)
            w_mlp_in, b_mlp_in = h4.weight.detach(), _detach(h4.bias)
        else:
            ln_attn, ln_mlp = _norm(block.input_layernorm), None
            w_in = _fuse_rows(qkv, h4)
            b_in = torch.cat([qkv.bias, h4.bias]).detach() if qkv.bias is not None else None
            w_mlp_in = b_mlp_in = None
        w_out = _fuse_columns(dense, h4h)
        b_out = (dense.bias + h4h.bias).detach() if dense.bias is not None else None
        cache = torch.zeros(self.kv_heads, self.max_len, self.head_dim, dtype=self.dtype, device=self.device)
        return _Layer(ln_attn, ln_mlp, w_in, b_in, w_mlp_in, b_mlp_in, w_out, b_out, cache, cache.clone())

    def warm_up(self) -> None:
        """Compile and capture the one-token step; call on the thread that will generate.

        If that fails, log why and serve every request with plain `generate` instead.
        """
        if not self.use_graphs or self.ready:
            return
        try:
            self._capture()
        except Exception as error:
            from .local import PlainDecoder

            log.warning("fast decoder: CUDA-graph capture failed, using plain generate (%s: %s)",
                        type(error).__name__, error, exc_info=True)  # fmt: skip
            self._graphs.clear()
            self._fallback = PlainDecoder(self.model, self._tokenizer)
            self.name = self._fallback.name
        self.ready = True

    def _capture(self) -> None:
        start = time.monotonic()
        if self.compile_mode != "off":
            log.info("fast decoder: compiling the layer step (torch.compile, mode %s)", self.compile_mode)
            compile_kwargs = {"fullgraph": True, "dynamic": False}
            if self.compile_mode != "default":
                compile_kwargs["mode"] = self.compile_mode
            self._project_in = torch.compile(_project_in, **compile_kwargs)
            self._decode_in = torch.compile(_decode_in, **compile_kwargs)
            self._attend_torch = torch.compile(attend_reference, **compile_kwargs)
            self._project_out = torch.compile(_project_out, **compile_kwargs)
            self._head = torch.compile(_head, **compile_kwargs)
        # Coordinate-descent tuning makes Inductor write one-row products as tuned Triton
        # reductions (gpt-fast's setting); it applies while the first calls below compile.
        import torch._inductor.config as inductor_config

        with torch.inference_mode(), inductor_config.patch(coordinate_descent_tuning=True):
            self._reset(torch.tensor([[0, 1, 2]]))
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up launches (and compiles) off the capture stream
                for greedy in (True, False):
                    for _ in range(3):
                        self._step(greedy)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            log.info("fast decoder: compiled in %.1f s; capturing CUDA graphs", time.monotonic() - start)
            pool = None
            for greedy in (True, False):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._step(greedy)
                pool = graph.pool()
                self._graphs[greedy] = graph
            torch.cuda.synchronize()
        log.info("fast decoder: ready in %.1f s", time.monotonic() - start)

    # -- the decode loop ---------------------------------------------------------------------

    def generate(self, input_ids, params: GenerationParams, seed: int, emit, cancelled) -> str:
        """Stream one reply: prefill, then one graph replay per token (see `Decoder`)."""
        prompt_len = input_ids.shape[-1]
        if prompt_len >= self.max_len:
            raise ValueError(f"prompt of {prompt_len} tokens does not fit the {self.max_len}-token cache")
        if self.use_graphs and not self.ready:
            self.warm_up()
        if self._fallback is not None:
            return self._fallback.generate(input_ids, params, seed, emit, cancelled)
        torch.manual_seed(seed)  # seeds the CPU and every CUDA generator, as the plain path does
        with torch.inference_mode():
            self.knobs.set(params, self.vocab)
            self._reset(input_ids)
            self._prefill(prompt_len, params.greedy)
            return self._stream(prompt_len, params, emit, cancelled)

    def _stream(self, prompt_len: int, params, emit, cancelled) -> str:
        # The step for token n+1 is queued before token n is read back, so Python's per-token
        # work (emit, the stop checks) overlaps the GPU's. After a stop, one queued step is
        # wasted; nothing it wrote is read.
        position, count = prompt_len, 0
        pending = self._read(position)
        while True:
            room = count + 1 < params.max_new_tokens and position + 1 < self.max_len
            if room:
                self._replay(params.greedy)
            token = pending()
            if room:
                pending = self._read(position + 1)
            emit(token)
            count += 1
            if token == self.eos_token_id:
                return FINISH_STOP
            if cancelled():
                return FINISH_CANCELLED
            if not room:
                return FINISH_LENGTH
            position += 1

    def _replay(self, greedy: bool) -> None:
        if self.use_graphs:
            self._graphs[greedy].replay()
        else:
            self._step(greedy)

    def _read(self, position: int):
        """Start reading history[position] to the host; returns a function that waits for it."""
        if not self.use_graphs:
            return lambda: int(self.history[position])
        buffer = torch.empty(1, dtype=torch.long, pin_memory=True)
        buffer.copy_(self.history[position : position + 1], non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def wait() -> int:
            done.synchronize()
            return int(buffer[0])

        return wait

    def _reset(self, input_ids) -> None:
        ids = input_ids.reshape(-1).to(self.device)
        self.history[: ids.numel()].copy_(ids)
        self.pos.fill_(ids.numel())
        self.seen.zero_()
        self.seen[ids] = True

    # -- the model ----------------------------------------------------------------------------

    def _prefill(self, prompt_len: int, greedy: bool) -> None:
        """Run the prompt through the model, fill the cache, choose the first new token."""
        ids = self.history[:prompt_len]
        x = F.embedding(ids, self.embed)
        cos, sin = self.cos[:prompt_len], self.sin[:prompt_len]
        for layer in self.layers:
            x = _prefill_layer(x, layer, cos, sin, self.kv_heads, self.group, self.head_dim)
        self.pos.fill_(prompt_len - 1)  # the last prompt token's position, as after a step
        logits = _logits(x[-1:], self.ln_f, self.lm_head)
        _choose(logits, self.seen, self.knobs, self._not_last, greedy, self.history, self.pos)

    def _step(self, greedy: bool) -> None:
        """One token: read history[pos + 1] at pos + 1, write its successor after it."""
        self.pos.add_(1)
        token = self.history.index_select(0, self.pos)
        x = F.embedding(token, self.embed)
        if self.flash is not None:
            for layer in self.layers:
                x = self._flash_layer(x, layer)
        else:
            cos, sin = self.cos.index_select(0, self.pos), self.sin.index_select(0, self.pos)
            shape = (self.kv_heads, self.group, self.head_dim)
            attn = self.joined[0, : self.num_heads * self.head_dim]
            for layer in self.layers:
                q = self._decode_in(x, *_inputs(layer), cos, sin, self.pos, self.joined, *shape)
                self._attend_torch(q, layer.k_cache, layer.v_cache, self.pos, self.positions, attn)
                x = self._project_out(x, self.joined, layer.w_out, layer.b_out)
        self._head(
            x,
            *self.ln_f,
            self.lm_head,
            self.seen,
            *self.knobs.tensors(),
            self._not_last,
            greedy,
            self.history,
            self.pos,
        )

    def _flash_layer(self, x, layer: _Layer):
        """One layer on a GPU: compiled input product, three Triton kernels, compiled out-product."""
        # Measured slower on the H100 (README, Performance): splitting the out-projection in two,
        # running the MLP's half on a second stream beside attention, attention values by cuBLAS.
        qkv_size = (self.kv_heads * (self.group + 2)) * self.head_dim
        qkv, h = self._project_in(x, *_inputs(layer)[:10], qkv_size)
        k_cache, v_cache = layer.k_cache, layer.v_cache
        q = self.flash.rotate_and_store(qkv, h, self.cos, self.sin, self.pos, k_cache, v_cache, self.joined)
        self.flash(q, k_cache, v_cache, self.pos, self.joined)
        return self._project_out(x, self.joined, layer.w_out, layer.b_out)


# -- the pieces, as plain functions (what torch.compile sees) -------------------------------------


def _inputs(layer: _Layer) -> tuple:
    return (
        *layer.ln_attn, *(layer.ln_mlp or (None, None, 0.0)),
        layer.w_in, layer.b_in, layer.w_mlp_in, layer.b_mlp_in, layer.k_cache, layer.v_cache,
    )  # fmt: skip


def _project_in(x, ln_w, ln_b, eps, ln2_w, ln2_b, eps2, w_in, b_in, w_mlp_in, b_mlp_in, qkv_size):
    """Normed input through QKV and the MLP's first layer: (qkv, h)."""
    normed = F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps)
    if w_mlp_in is None:  # one norm feeds both: one product
        fused = F.linear(normed, w_in, b_in)
        return fused[..., :qkv_size], fused[..., qkv_size:]
    normed_mlp = F.layer_norm(x, (x.shape[-1],), ln2_w, ln2_b, eps2)
    return F.linear(normed, w_in, b_in), F.linear(normed_mlp, w_mlp_in, b_mlp_in)


def _split_rotate(qkv, cos, sin, kv_heads, group, head_dim):
    """Falcon's fused QKV is [kv_heads, group queries + key + value, head_dim] for every layout."""
    qkv = qkv.view(qkv.shape[0], kv_heads, group + 2, head_dim)
    q, k, v = qkv[:, :, :group], qkv[:, :, group], qkv[:, :, group + 1]
    q = _rotate(q, cos[:, None, None], sin[:, None, None])
    k = _rotate(k, cos[:, None], sin[:, None])
    return q, k, v  # [T, kv, group, d], [T, kv, d], [T, kv, d]


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _join(attn, h):
    """The out-projection's input: attention output and GELU(h) side by side."""
    return torch.cat((attn, F.gelu(h)), dim=-1)


def _project_out(x, joined, w_out, b_out):
    """x + dense(attn) + 4h_to_h(gelu(h)), as one product over the two inputs side by side."""
    # A plain product and an add (not addmm): Inductor turns a one-row product into a Triton
    # reduction with the add fused in, which streams the weight faster than cuBLAS's GEMV.
    return x + F.linear(joined, w_out, b_out)


# One decode layer is three pieces: the input side (`_decode_in`; on a GPU the compiled
# `_project_in` and decode_attention's rotary kernel), attention, the out-projection. The
# boundaries make Inductor write GELU(h) to memory once: inside one graph it recomputed it in
# the next reduction for every output row (GELU 4,544 times on Falcon-7B). torch's fused
# attention calls run one block per KV head for one query position (31 us a layer on the H100
# for Falcon-7B's single KV head): hence decode_attention's kernels.


def _decode_in(
    x, ln_w, ln_b, eps, ln2_w, ln2_b, eps2, w_in, b_in, w_mlp_in, b_mlp_in,
    k_cache, v_cache, cos, sin, pos, joined, kv_heads: int, group: int, head_dim: int,
):  # fmt: skip
    """Project, rotate, write the cache at `pos` and GELU(h) after the attention part of `joined`.

    Returns the rotated queries [kv_heads, group, head_dim], for attention to fill the rest.
    """
    qkv, h = _project_in(x, ln_w, ln_b, eps, ln2_w, ln2_b, eps2, w_in, b_in, w_mlp_in, b_mlp_in,
                         (kv_heads * (group + 2)) * head_dim)  # fmt: skip
    q, k, v = _split_rotate(qkv, cos, sin, kv_heads, group, head_dim)
    k_cache[:, pos] = k.transpose(0, 1)
    v_cache[:, pos] = v.transpose(0, 1)
    joined[:, kv_heads * group * head_dim :] = F.gelu(h)
    return q[0].contiguous()


def _prefill_layer(x, layer: _Layer, cos, sin, kv_heads, group, head_dim):
    """One layer over the whole prompt (eager): causal attention over the prompt's own keys."""
    t = x.shape[0]
    qkv, h = _project_in(x, *layer.ln_attn, *(layer.ln_mlp or (None, None, 0.0)),
                         layer.w_in, layer.b_in, layer.w_mlp_in, layer.b_mlp_in,
                         (kv_heads * (group + 2)) * head_dim)  # fmt: skip
    q, k, v = _split_rotate(qkv, cos, sin, kv_heads, group, head_dim)
    layer.k_cache[:, :t] = k.transpose(0, 1)
    layer.v_cache[:, :t] = v.transpose(0, 1)
    q = q.permute(1, 2, 0, 3).reshape(1, kv_heads * group, t, head_dim)
    k = k.transpose(0, 1)[None].repeat_interleave(group, dim=1)
    v = v.transpose(0, 1)[None].repeat_interleave(group, dim=1)
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    attn = attn[0].transpose(0, 1).reshape(t, -1)
    return _project_out(x, _join(attn, h), layer.w_out, layer.b_out)


def _logits(x, ln_f, lm_head):
    return F.linear(F.layer_norm(x, (x.shape[-1],), *ln_f[:2], ln_f[2]), lm_head)[-1].float()


def _head(x, ln_w, ln_b, eps, lm_head, seen, penalty, temperature, top_k_index, top_p, not_last,
          greedy: bool, history, pos):  # fmt: skip
    logits = _logits(x, (ln_w, ln_b, eps), lm_head)
    knobs = (penalty, temperature, top_k_index, top_p)
    _choose_tensors(logits, seen, knobs, not_last, greedy, history, pos)


# -- sampling: transformers' processors, on the GPU, with the knobs in tensors ---------------------


class _Knobs:
    """A request's sampling parameters as GPU tensors, so one captured graph serves them all."""

    def __init__(self, device):
        self.penalty = torch.ones(1, device=device)
        self.temperature = torch.ones(1, device=device)
        self.top_k_index = torch.zeros(1, dtype=torch.long, device=device)
        self.top_p = torch.ones(1, device=device)

    def set(self, params: GenerationParams, vocab: int) -> None:
        top_k = params.top_k if 0 < params.top_k < vocab else vocab  # 0 means off
        self.penalty.fill_(params.repetition_penalty)
        self.temperature.fill_(params.temperature if not params.greedy else 1.0)
        self.top_k_index.fill_(top_k - 1)
        self.top_p.fill_(params.top_p)

    def tensors(self) -> tuple:
        return self.penalty, self.temperature, self.top_k_index, self.top_p


def _choose(logits, seen, knobs: _Knobs, not_last, greedy, history, pos) -> None:
    _choose_tensors(logits, seen, knobs.tensors(), not_last, greedy, history, pos)


def _choose_tensors(logits, seen, knobs, not_last, greedy: bool, history, pos) -> None:
    """Pick the token after history[pos], write it to history[pos + 1] and mark it seen."""
    penalty = knobs[0]
    logits = torch.where(seen, penalize(logits, penalty), logits)
    if greedy:
        token = logits.argmax(-1, keepdim=True)
    else:
        probs = sampling_probs(logits, knobs, not_last)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws index i with probability p_i,
        # without multinomial's host synchronisation.
        token = (probs / torch.empty_like(probs).exponential_(1)).argmax(-1, keepdim=True)
    history.index_copy_(0, pos + 1, token)
    seen.index_fill_(0, token, True)


def penalize(logits, penalty):
    """transformers' RepetitionPenaltyLogitsProcessor, for the tokens it is applied to."""
    return torch.where(logits < 0, logits * penalty, logits / penalty)


def sampling_probs(logits, knobs, not_last):
    """Temperature, then top-k, then top-p, as transformers orders and defines them; probabilities."""
    _, temperature, top_k_index, top_p = knobs
    scores = logits / temperature
    ascending, order = scores.sort(descending=False)
    vocab = scores.shape[-1]
    # top-k: drop what is below the k-th largest (ties with it stay), k = index + 1.
    kth = ascending.gather(-1, vocab - 1 - top_k_index)
    ascending = ascending.masked_fill(ascending < kth, -math.inf)
    # top-p: drop the low tail whose total probability is at most 1 - top_p; keep the top token.
    tail = ascending.softmax(-1).cumsum(-1) <= (1 - top_p)
    ascending = ascending.masked_fill(tail & not_last, -math.inf)
    return torch.zeros_like(scores).scatter_(-1, order, ascending.softmax(-1))


# -- weight layout ----------------------------------------------------------------------------


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
