"""One-query attention over a static KV cache (flash decoding), for the fast decoder's step.

Each decode step attends one new position to the `pos + 1` cached ones. Written as tensor
reductions (Inductor) it reads the whole `max_len` cache and costs ~21 us a layer on an H100;
one fused attention call runs one block per KV head (Falcon-7B has one). Here two Triton kernels
do it: the cache is cut into chunks and each program attends a block of query heads to one chunk
(partial max, sum and weighted values in float32), then a second kernel merges the chunks and
writes the result, in the model's dtype, into the buffer that the out-projection reads. The
position is read from the GPU tensor `pos` inside the kernels, so one CUDA graph serves every
position and chunks past it return at once: the work follows the real length, not `max_len`.

A third kernel runs before them: it rotates the new query and key (rotary), writes the key and
value into the caches at `pos` and GELU(h) after the attention part of that buffer, in one launch
where Inductor made four small kernels.

`attend_rows` is the same attention in plain torch, for T query rows at once (a token, or a
speculative verify step's rows): the CPU path and, as `attend_reference`, the tests' reference.
"""

from __future__ import annotations

import math

import torch

try:  # Triton comes with CUDA builds of torch; the CPU path needs none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installed torch
    triton = None

BLOCK_N = 32  # cache positions per inner step (32 and 64 splits: best on the H100, bench/decode_attention.py)
BLOCK_G = 16  # query heads per program (tl.dot needs at least 16 rows)
MAX_SPLITS = 64  # chunks the cache is cut into, at most
BLOCK_ROTATE = 1024  # elements per program of the rotary / cache-write / GELU kernel


def attend_reference(q, k_cache, v_cache, pos, positions, out) -> None:
    """q [kv, group, d] attends to cache positions <= pos; writes [kv * group * d] into out."""
    attend_rows(q[None], k_cache, v_cache, pos, positions, out)


def attend_rows(q, k_cache, v_cache, rows, positions, out) -> None:
    """q [T, kv, group, d]: row t attends to cache positions <= rows[t] (a speculative verify
    step's rows see their own and those before them); writes [T, kv * group * d] into out."""
    scores = torch.einsum("tkgd,knd->tkgn", q.float(), k_cache.float()) / math.sqrt(q.shape[-1])
    visible = positions[None, :] <= rows[:, None]  # [T, max_len]
    probs = scores.masked_fill(~visible[:, None, None, :], -math.inf).softmax(-1)
    attn = torch.einsum("tkgn,knd->tkgd", probs, v_cache.float())
    out.copy_(attn.reshape(out.shape))


class FlashDecode:
    """The Triton kernels and their float32 scratch space for one cache layout (CUDA only)."""

    def __init__(
        self,
        kv_heads: int,
        group: int,
        head_dim: int,
        max_len: int,
        device,
        dtype=torch.bfloat16,
        *,
        block_n: int = BLOCK_N,
        block_g: int = BLOCK_G,
        max_splits: int = MAX_SPLITS,
        num_warps: int = 4,
    ):
        if triton is None:
            raise RuntimeError("flash decoding needs Triton")
        if head_dim & (head_dim - 1):
            raise ValueError(f"head_dim {head_dim} is not a power of two")
        self.kv_heads, self.group, self.head_dim, self.max_len = kv_heads, group, head_dim, max_len
        self.block_n, self.num_warps = block_n, num_warps
        blocks = triton.cdiv(max_len, block_n)
        self.chunk = triton.cdiv(blocks, max_splits) * block_n  # a whole number of blocks
        self.splits = triton.cdiv(max_len, self.chunk)
        self.block_g = max(16, min(block_g, triton.next_power_of_2(group)))
        self.group_blocks = triton.cdiv(group, self.block_g)
        shape = (kv_heads, self.splits, group)
        self.max_score = torch.empty(shape, dtype=torch.float32, device=device)
        self.total = torch.empty(shape, dtype=torch.float32, device=device)
        self.partial = torch.empty((*shape, head_dim), dtype=torch.float32, device=device)
        self.scale = 1.0 / math.sqrt(head_dim)
        self.queries = torch.empty(kv_heads, group, head_dim, dtype=dtype, device=device)

    def rotate_and_store(self, qkv, h, cos, sin, pos, k_cache, v_cache, joined):
        """From the input product's outputs: rotated queries (returned, [kv, group, d]), key and
        value written at `pos`, GELU(h) written after the attention part of `joined` (Falcon).

        qkv [1, kv * (group + 2) * d] in the layout's fused order (layout.py); h [1, ffn], or None
        where the MLP does not run beside attention (Llama); cos/sin the whole [max_len, d] rotary
        tables (row `pos` is read in the kernel).
        """
        n_qkv = qkv.shape[-1]
        n_h = 0 if h is None else h.shape[-1]
        h = qkv if h is None else h  # no GELU programs are launched then
        qkv_programs = triton.cdiv(n_qkv, BLOCK_ROTATE)
        _rotate_store_gelu[(qkv_programs + triton.cdiv(n_h, BLOCK_ROTATE),)](
            qkv,
            h,
            cos,
            sin,
            pos,
            k_cache,
            v_cache,
            self.queries,
            joined,
            self.max_len,
            n_qkv,
            n_h,
            self.kv_heads * self.group * self.head_dim,
            qkv_programs,
            GROUP=self.group,
            HEAD_DIM=self.head_dim,
            BLOCK=BLOCK_ROTATE,
            num_warps=4,
        )
        return self.queries

    def __call__(self, q, k_cache, v_cache, pos, out) -> None:
        """Like `attend_reference` (without `positions`); every tensor on the GPU, contiguous."""
        _partial_attention[(self.kv_heads, self.group_blocks, self.splits)](
            q,
            k_cache,
            v_cache,
            pos,
            self.max_score,
            self.total,
            self.partial,
            self.max_len,
            self.scale,
            GROUP=self.group,
            HEAD_DIM=self.head_dim,
            SPLITS=self.splits,
            CHUNK=self.chunk,
            BLOCK_G=self.block_g,
            BLOCK_N=self.block_n,
            FLOAT32=q.dtype == torch.float32,
            num_warps=self.num_warps,
        )
        _merge_chunks[(self.kv_heads, self.group)](
            self.max_score,
            self.total,
            self.partial,
            pos,
            out,
            GROUP=self.group,
            HEAD_DIM=self.head_dim,
            SPLITS=self.splits,
            CHUNK=self.chunk,
            SPLITS_POW2=triton.next_power_of_2(self.splits),
            num_warps=1,
        )


if triton is not None:

    @triton.jit
    def _rotate_store_gelu(
        qkv_ptr,
        h_ptr,
        cos_ptr,
        sin_ptr,
        pos_ptr,
        k_ptr,
        v_ptr,
        q_ptr,
        joined_ptr,
        max_len,
        n_qkv,
        n_h,
        attn_size,
        qkv_programs,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Programs below qkv_programs: rotary and cache writes; the others: GELU (erf, as F.gelu)."""
        program = tl.program_id(0)
        if program < qkv_programs:
            pos = tl.load(pos_ptr)
            offsets = program * BLOCK + tl.arange(0, BLOCK)
            ok = offsets < n_qkv
            slot, dim = offsets // HEAD_DIM, offsets % HEAD_DIM
            head, role = slot // (GROUP + 2), slot % (GROUP + 2)  # role: query 0..GROUP-1, key, value
            half: tl.constexpr = HEAD_DIM // 2
            first_half = dim < half
            rotates = ok & (role <= GROUP)
            x = tl.load(qkv_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            partner = tl.load(
                qkv_ptr + tl.where(first_half, offsets + half, offsets - half), mask=rotates, other=0.0
            ).to(tl.float32)
            cos = tl.load(cos_ptr + pos * HEAD_DIM + dim, mask=rotates, other=0.0).to(tl.float32)
            sin = tl.load(sin_ptr + pos * HEAD_DIM + dim, mask=rotates, other=0.0).to(tl.float32)
            # x * cos + rotate_half(x) * sin, rotate_half(x) = [-x[half:], x[:half]]
            rotated = x * cos + tl.where(first_half, -partner, partner) * sin
            tl.store(
                q_ptr + (head * GROUP + role) * HEAD_DIM + dim,
                rotated.to(q_ptr.dtype.element_ty),
                mask=ok & (role < GROUP),
            )
            cache = (head * max_len + pos) * HEAD_DIM + dim
            tl.store(k_ptr + cache, rotated.to(k_ptr.dtype.element_ty), mask=ok & (role == GROUP))
            tl.store(v_ptr + cache, x.to(v_ptr.dtype.element_ty), mask=ok & (role == GROUP + 1))
        else:
            offsets = (program - qkv_programs) * BLOCK + tl.arange(0, BLOCK)
            ok = offsets < n_h
            x = tl.load(h_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            gelu = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
            tl.store(joined_ptr + attn_size + offsets, gelu.to(joined_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _partial_attention(
        q_ptr,
        k_ptr,
        v_ptr,
        pos_ptr,
        max_ptr,
        total_ptr,
        partial_ptr,
        max_len,
        scale,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        SPLITS: tl.constexpr,
        CHUNK: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_N: tl.constexpr,
        FLOAT32: tl.constexpr,
    ):
        """One (KV head, block of query heads, chunk of the cache): softmax statistics and values."""
        head, group_block, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        length = tl.load(pos_ptr).to(tl.int32) + 1
        start = split * CHUNK
        if start < length:  # chunks past the position do nothing
            rows = group_block * BLOCK_G + tl.arange(0, BLOCK_G)
            dims = tl.arange(0, HEAD_DIM)
            row_ok = rows < GROUP
            q = tl.load(
                q_ptr + (head * GROUP + rows[:, None]) * HEAD_DIM + dims[None, :],
                mask=row_ok[:, None],
                other=0.0,
            )
            cache = head * max_len * HEAD_DIM
            best = tl.full([BLOCK_G], -float("inf"), tl.float32)
            total = tl.zeros([BLOCK_G], tl.float32)
            acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
            end = tl.minimum(start + CHUNK, length)
            # A fixed trip count (blocks past the position are masked: no loads, weight 0).
            for block in range(CHUNK // BLOCK_N):
                keys = start + block * BLOCK_N + tl.arange(0, BLOCK_N)
                key_ok = keys < end
                offsets = cache + keys[:, None] * HEAD_DIM + dims[None, :]
                k = tl.load(k_ptr + offsets, mask=key_ok[:, None], other=0.0)
                v = tl.load(v_ptr + offsets, mask=key_ok[:, None], other=0.0)
                if FLOAT32:  # three-pass TF32: float32 accuracy on the tensor cores
                    scores = tl.dot(q, tl.trans(k), input_precision="tf32x3") * scale
                else:  # bf16/fp16 products are exact in float32, summed in float32: as the torch path
                    scores = tl.dot(q, tl.trans(k)) * scale
                scores = tl.where(key_ok[None, :], scores, -float("inf"))
                new_best = tl.maximum(best, tl.max(scores, 1))
                rescale = tl.exp(best - new_best)
                probs = tl.exp(scores - new_best[:, None])
                total = total * rescale + tl.sum(probs, 1)
                # Probabilities stay float32 (no bf16 rounding): fp32 products, three-pass TF32.
                acc = acc * rescale[:, None] + tl.dot(probs, v.to(tl.float32), input_precision="tf32x3")
                best = new_best
            stats = (head * SPLITS + split) * GROUP + rows
            tl.store(max_ptr + stats, best, mask=row_ok)
            tl.store(total_ptr + stats, total, mask=row_ok)
            tl.store(partial_ptr + stats[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None])

    @triton.jit
    def _merge_chunks(
        max_ptr,
        total_ptr,
        partial_ptr,
        pos_ptr,
        out_ptr,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        SPLITS: tl.constexpr,
        CHUNK: tl.constexpr,
        SPLITS_POW2: tl.constexpr,
    ):
        """One query head: merge the chunks' statistics, write the output in out's dtype."""
        head, row = tl.program_id(0), tl.program_id(1)
        length = tl.load(pos_ptr).to(tl.int32) + 1
        splits = tl.arange(0, SPLITS_POW2)
        used = (splits < SPLITS) & (splits * CHUNK < length)  # the chunks the first kernel wrote
        stats = (head * SPLITS + splits) * GROUP + row
        best = tl.load(max_ptr + stats, mask=used, other=-float("inf"))
        total = tl.load(total_ptr + stats, mask=used, other=0.0)
        dims = tl.arange(0, HEAD_DIM)
        partial = tl.load(
            partial_ptr + stats[:, None] * HEAD_DIM + dims[None, :], mask=used[:, None], other=0.0
        )
        overall = tl.max(best, 0)
        weight = tl.where(used, tl.exp(best - overall), 0.0)
        attn = tl.sum(partial * weight[:, None], 0) / tl.sum(total * weight, 0)
        out = out_ptr + (head * GROUP + row) * HEAD_DIM + dims
        tl.store(out, attn.to(out_ptr.dtype.element_ty))
