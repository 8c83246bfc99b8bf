"""Our int4 GEMV in Triton: a few rows of x times an int4 weight, at the speed of reading it.

Decoding multiplies one row by every weight, so a token costs the time to read the weights; the
kernel's job is to read int4 as fast as the GPU copies memory while doing as little arithmetic
per weight as it can: at the copy rate an H100/H200 has time for only 3-4 instructions a weight.

Layout (`pack`): int32 words [groups, out, G / 8], so a program's tile for one group (G / 8 words
for each of BLOCK_N outputs) is one contiguous block; scale and offset [groups, out]. In each
group of G columns, word t holds columns t + i * G / 8 in its nibble i.

Arithmetic, on a GPU (`_WORD_DOT_PTX`, fp16x2): one `lop3` makes two fp16 of two nibbles (q/16
exactly), and each word's 8 levels times x, packed in the same pairs by `_pack_x`, are summed in
fp16x2 and the two lanes added in float32: 17 instructions per 8 weights. Where there is no GPU
(Triton's interpreter, the tests) the same kernel runs in float32: a nibble OR'd into the
mantissa of 2**23 gives the float 2**23 + q * 16**i exactly, less 2**23, times x / 16**i. Either
way the group's scale multiplies the group's partial sums once and the offset adds
offset * sum(x): sum((q * s + o) * x) = s * sum(q * x) + o * sum(x).

Parallelism: programs take BLOCK_N outputs each and, when that is too few programs to keep every
multiprocessor reading, SPLIT slices of the groups (the last may be shorter); the slices' float32
partial sums are added by a second small kernel in a fixed order (deterministic, unlike atomics).
Which (BLOCK_N, SPLIT, warps, stages) is fastest depends on the shape and the GPU: `tune` times
the candidates on the weight at hand as the decoder runs them (tuning.py) and remembers the
winner per shape (bench/int4_gemv.py prints the whole sweep; docs/performance.md has the numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chat.engine.int4.weight import Int4Weight, unpack

try:  # Triton comes with CUDA builds of torch; the CPU reference needs none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is absent
    triton = None


@dataclass(frozen=True)
class Config:
    block_n: int
    split: int
    warps: int
    stages: int
    prefetch: bool = False  # load the next group's words before working on this one's
    half2: bool = True  # fp16x2 arithmetic (inline PTX: a GPU only; Triton's interpreter runs float32)

    def __str__(self) -> str:
        flags = (" pf" if self.prefetch else "") + ("" if self.half2 else " f32")
        return f"n{self.block_n} s{self.split} w{self.warps} st{self.stages}{flags}"


# The sweep (bench/int4_gemv.py) covers more; `tune` chooses among these.
CANDIDATES = tuple(
    Config(n, s, w, st, pf)
    for n, s, w, st, pf in (
        (64, 4, 4, 3, False),  # the best on most 180B and 40B products (H200 sweep)
        (64, 4, 4, 1, False),
        (128, 4, 8, 1, False),
        (128, 8, 4, 1, True),
        (128, 4, 4, 3, False),
        (256, 4, 8, 1, False),
        (64, 2, 4, 3, False),
        (64, 8, 4, 3, False),
        (64, 16, 4, 3, False),  # short rows (7B): more slices, more programs
        (32, 8, 4, 3, False),
        (64, 8, 4, 1, True),
        (64, 1, 4, 3, False),
        (256, 16, 4, 3, False),  # the best on 7B's fused input product and LM head (H200 sweep)
        (256, 16, 4, 1, False),
    )
)
DEFAULT = Config(64, 4, 4, 3)
_chosen: dict[tuple, Config] = {}


# -- layout ---------------------------------------------------------------------------------------


def pack(weight: Int4Weight, rows_per_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(words [groups, out, G / 8] int32, scale [groups, out], offset [groups, out]) for `gemv`.

    Built a chunk of output rows at a time: the int32 scratch of a whole 180B MLP weight would
    be 3.5 GB.
    """
    out_features, in_features = weight.shape
    per_group = weight.group_size // 8
    groups = in_features // weight.group_size
    words = torch.empty(groups, out_features, per_group, dtype=torch.int32, device=weight.packed.device)
    for start in range(0, out_features, rows_per_chunk):
        stop = min(start + rows_per_chunk, out_features)
        q = unpack(weight.packed[start:stop]).to(torch.int32).view(stop - start, groups, 8, per_group)
        chunk = torch.zeros(stop - start, groups, per_group, dtype=torch.int32, device=q.device)
        for i in range(8):
            chunk |= q[:, :, i, :] << (4 * i)  # bit 31 wraps to the sign: read back with masks only
        words[:, start:stop] = chunk.transpose(0, 1)
        del q, chunk
    return words, weight.scale.t().contiguous(), weight.offset.t().contiguous()


def levels(words: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack`'s words: uint8 levels [out, in]."""
    groups, out_features, per_group = words.shape
    by_row = words.transpose(0, 1)  # [out, groups, words]
    nibbles = torch.stack([(by_row >> (4 * i)) & 15 for i in range(8)], dim=2)  # [out, groups, 8, words]
    return nibbles.reshape(out_features, -1).to(torch.uint8)


def dequantize(words, scale, offset, dtype) -> torch.Tensor:
    """The dense weight transposed, [in, out], in `dtype` (a prompt's rows take one dense
    product): Triton's one pass on a GPU, torch elsewhere."""
    groups, out_features, per_group = words.shape
    if triton is not None and words.is_cuda:
        return dense_by_triton(words, scale, offset, dtype)
    q = levels(words).view(out_features, groups, per_group * 8).to(dtype)
    w = q * scale.t()[..., None].to(dtype) + offset.t()[..., None].to(dtype)
    return w.view(out_features, -1).t()


def dense_by_triton(words, scale, offset, dtype) -> torch.Tensor:
    groups, out_features, per_group = words.shape
    dense = torch.empty(groups * per_group * 8, out_features, dtype=dtype, device=words.device)
    block_n = 128
    _dequantize[(groups, triton.cdiv(out_features, block_n))](
        words, scale, offset, dense, out_features, GROUP=per_group * 8, BLOCK_N=block_n, num_warps=4
    )
    return dense


# Two nibbles to two fp16 at once (lop3 = (w & mask) | magic): 0x5400 is 64.0 with a last
# mantissa bit of 1/16, 0x4400 is 4.0 with 1/256, so a nibble at bits 0-3 (or 16-19) of the first
# and one at bits 4-7 (20-23) of the second both read back as 64 + q/16 or 4 + q/16, exactly;
# subtracting the magic leaves q/16. Each word's 8 levels times its 8 x values (packed the same
# way by _pack_x) are summed in fp16x2 (4 products a lane, so no overflow below |x| = 16,384)
# and the two lanes added in float32: 17 instructions per 8 weights instead of ~27.
_WORD_DOT_PTX = """{
.reg .b32 a, b, c, d, h, k64, k4, s;
.reg .b16 lo, hi;
.reg .f32 flo, fhi;
mov.b32 k64, 0x54005400;
mov.b32 k4, 0x44004400;
lop3.b32 a, $1, 0x000F000F, 0x54005400, 0xEA;
lop3.b32 b, $1, 0x00F000F0, 0x44004400, 0xEA;
shr.u32 h, $1, 8;
lop3.b32 c, h, 0x000F000F, 0x54005400, 0xEA;
lop3.b32 d, h, 0x00F000F0, 0x44004400, 0xEA;
sub.f16x2 a, a, k64;
sub.f16x2 b, b, k4;
sub.f16x2 c, c, k64;
sub.f16x2 d, d, k4;
mul.f16x2 s, a, $2;
fma.rn.f16x2 s, b, $3, s;
fma.rn.f16x2 s, c, $4, s;
fma.rn.f16x2 s, d, $5, s;
mov.b32 {lo, hi}, s;
cvt.f32.f16 flo, lo;
cvt.f32.f16 fhi, hi;
add.f32 flo, flo, fhi;
mov.b32 $0, flo;
}"""


# -- kernels --------------------------------------------------------------------------------------

if triton is not None:
    _WORD_DOT_ASM = tl.constexpr(_WORD_DOT_PTX)  # a kernel reads module globals only as constexpr

    @triton.jit
    def _pack_x(x_ptr, xp_ptr, xs_ptr, K, GROUP: tl.constexpr):
        # x for the fp16x2 path: per group, 4 words per t pairing x's columns as the nibbles
        # pair ([groups, 4, G / 8] int32, fp16 in each half), and the group's sum in float32.
        g = tl.program_id(0)
        row = tl.program_id(1)
        n_groups = K // GROUP
        words: tl.constexpr = GROUP // 8
        t = tl.arange(0, words)
        base = x_ptr + row.to(tl.int64) * K + g * GROUP
        total = 0.0
        for p in tl.static_range(4):
            lo = tl.load(base + p * words + t).to(tl.float32)
            hi = tl.load(base + (p + 4) * words + t).to(tl.float32)
            total += tl.sum(lo, axis=0) + tl.sum(hi, axis=0)
            tl.store(xp_ptr + ((row * n_groups + g) * 4 + p).to(tl.int64) * words + t, _pair(lo, hi))
        tl.store(xs_ptr + row * n_groups + g, total)

    @triton.jit
    def _gemv(
        x_ptr,
        w_ptr,
        s_ptr,
        o_ptr,
        out_ptr,
        N,
        K,
        GROUP: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SPLIT: tl.constexpr,
        PREFETCH: tl.constexpr,
        HALF2: tl.constexpr = False,
        RAGGED: tl.constexpr = False,
        xp_ptr=None,
        xs_ptr=None,
    ):
        # A tile is one group's words for BLOCK_N outputs: [BLOCK_N, GROUP / 8], contiguous in memory.
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        row = tl.program_id(2)
        words: tl.constexpr = GROUP // 8
        n_groups = K // GROUP
        groups_per_split = (n_groups + SPLIT - 1) // SPLIT  # RAGGED: the last slice is shorter
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        t = tl.arange(0, words)
        first = pid_k * groups_per_split
        acc = tl.zeros([BLOCK_N, words], dtype=tl.float32)
        acc_offset = tl.zeros([BLOCK_N], dtype=tl.float32)
        x_row = x_ptr + row.to(tl.int64) * K
        w_tile = w_ptr + cols[:, None] * words + t[None, :]
        magic = 8388608.0  # 2**23
        if PREFETCH:
            w_next = tl.load(
                w_tile + first.to(tl.int64) * N * words, mask=col_ok[:, None] & (first < n_groups), other=0
            )
        for j in range(0, groups_per_split):  # (from 0: Triton's interpreter wants a plain start)
            g = first + j
            ok = col_ok & (g < n_groups) if RAGGED else col_ok  # past the end: zeros, which add nothing
            in_range = (g < n_groups) if RAGGED else True
            if PREFETCH:
                w = w_next
                more = (j + 1 < groups_per_split) & (g + 1 < n_groups)
                w_next = tl.load(
                    w_tile + (g + 1).to(tl.int64) * N * words, mask=col_ok[:, None] & more, other=0
                )
            else:
                w = tl.load(w_tile + g.to(tl.int64) * N * words, mask=ok[:, None], other=0)
            if HALF2:  # x packed by _pack_x; the asm gives sum(q * x) / 16 per word
                s = tl.load(s_ptr + g.to(tl.int64) * N + cols, mask=ok, other=0.0).to(tl.float32)
                o = tl.load(o_ptr + g.to(tl.int64) * N + cols, mask=ok, other=0.0).to(tl.float32)
                packed_x = xp_ptr + ((row * n_groups + g) * 4).to(tl.int64) * words + t
                xa = tl.broadcast_to(tl.load(packed_x, mask=in_range, other=0)[None, :], (BLOCK_N, words))
                xb = tl.broadcast_to(
                    tl.load(packed_x + words, mask=in_range, other=0)[None, :], (BLOCK_N, words)
                )
                xc = tl.broadcast_to(
                    tl.load(packed_x + 2 * words, mask=in_range, other=0)[None, :], (BLOCK_N, words)
                )
                xd = tl.broadcast_to(
                    tl.load(packed_x + 3 * words, mask=in_range, other=0)[None, :], (BLOCK_N, words)
                )
                part = tl.inline_asm_elementwise(
                    _WORD_DOT_ASM, "=r,r,r,r,r,r", [w, xa, xb, xc, xd], dtype=tl.int32, is_pure=True, pack=1
                )
                acc += part.to(tl.float32, bitcast=True) * (s * 16.0)[:, None]
                acc_offset += o * tl.load(xs_ptr + row * n_groups + g, mask=in_range, other=0.0)
            else:
                s = tl.load(s_ptr + g.to(tl.int64) * N + cols, mask=ok, other=0.0).to(tl.float32)
                o = tl.load(o_ptr + g.to(tl.int64) * N + cols, mask=ok, other=0.0).to(tl.float32)
                upper = w >> 20
                dots = tl.zeros([BLOCK_N, words], dtype=tl.float32)
                x_sum = tl.zeros([words], dtype=tl.float32)
                for i in tl.static_range(8):
                    x_i = tl.load(x_row + g * GROUP + i * words + t, mask=in_range, other=0.0).to(tl.float32)
                    x_sum += x_i
                    if i < 5:
                        bits = (w & (15 << (4 * i))) | 0x4B000000
                        x_i = x_i * (1.0 / (16**i))
                    else:
                        bits = (upper & (15 << (4 * (i - 5)))) | 0x4B000000
                        x_i = x_i * (1.0 / (16 ** (i - 5)))
                    dots += (bits.to(tl.float32, bitcast=True) - magic) * x_i[None, :]
                acc += dots * s[:, None]
                acc_offset += o * tl.sum(x_sum, axis=0)
        total = tl.sum(acc, axis=1) + acc_offset
        if SPLIT == 1:
            tl.store(out_ptr + row * N + cols, total.to(out_ptr.dtype.element_ty), mask=col_ok)
        else:  # float32 partial sums [rows, SPLIT, N], added by _sum_splits
            tl.store(out_ptr + (row * SPLIT + pid_k).to(tl.int64) * N + cols, total, mask=col_ok)

    @triton.jit
    def _pair(lo, hi):
        # Two x values as the fp16 pair of one int32 (lo in the low half), as _pack_x stores them.
        lo_bits = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return lo_bits | (hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16)

    @triton.jit
    def _dequantize(w_ptr, s_ptr, o_ptr, out_ptr, N, GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
        # One group's rows of the transposed dense weight [in, out]: stores run along `out`.
        g = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = cols < N
        words: tl.constexpr = GROUP // 8
        t = tl.arange(0, words)
        w = tl.load(
            w_ptr + (g.to(tl.int64) * N + cols[:, None]) * words + t[None, :], mask=ok[:, None], other=0
        )
        s = tl.load(s_ptr + g.to(tl.int64) * N + cols, mask=ok, other=0.0).to(tl.float32)
        o = tl.load(o_ptr + g.to(tl.int64) * N + cols, mask=ok, other=0.0).to(tl.float32)
        upper = w >> 20
        for i in tl.static_range(8):
            if i < 5:
                q = (((w & (15 << (4 * i))) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0) * (
                    1.0 / (16**i)
                )
            else:
                q = (
                    ((upper & (15 << (4 * (i - 5)))) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                ) * (1.0 / (16 ** (i - 5)))
            value = q * s[:, None] + o[:, None]  # [BLOCK_N, words]
            rows = g * GROUP + i * words + t
            tl.store(
                out_ptr + rows[None, :].to(tl.int64) * N + cols[:, None],
                value.to(out_ptr.dtype.element_ty),
                mask=ok[:, None],
            )

    @triton.jit
    def _sum_splits(part_ptr, out_ptr, N, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        row = tl.program_id(1)
        ok = cols < N
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(SPLIT):
            total += tl.load(part_ptr + (row * SPLIT + k) * N + cols, mask=ok, other=0.0)
        tl.store(out_ptr + row * N + cols, total.to(out_ptr.dtype.element_ty), mask=ok)


def gemv(x: torch.Tensor, words, scale, offset, config: Config | None = None) -> torch.Tensor:
    """x [rows, in] @ W.T for the packed weight (`pack`): [rows, out] in x's dtype, one program
    per row (several rows: rows.py reads the weight once for all of them).

    Without `config`, the one `tune` chose for this shape (DEFAULT before any tuning).
    """
    if triton is None:
        raise RuntimeError("the int4 GEMV needs Triton")
    x = x.contiguous()
    rows, in_features = x.shape
    n_groups, out_features, _ = words.shape
    config = config or _chosen.get(_key(x, words), DEFAULT)
    per_split = triton.cdiv(n_groups, min(config.split, n_groups))
    split = triton.cdiv(n_groups, per_split)  # no empty slice; the last may be shorter
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    partial = (
        None if split == 1 else torch.empty(rows, split, out_features, dtype=torch.float32, device=x.device)
    )
    group_size = in_features // n_groups
    half2 = config.half2 and x.is_cuda
    packed_x, x_sums = pack_x(x, n_groups) if half2 else (None, None)
    _gemv[(triton.cdiv(out_features, config.block_n), split, rows)](
        x,
        words,
        scale,
        offset,
        out if split == 1 else partial,
        out_features,
        in_features,
        GROUP=group_size,
        BLOCK_N=config.block_n,
        SPLIT=split,
        PREFETCH=config.prefetch,
        HALF2=half2,
        RAGGED=n_groups % split != 0,
        xp_ptr=packed_x,
        xs_ptr=x_sums,
        num_warps=config.warps,
        num_stages=config.stages,
    )
    if split > 1:
        sum_splits(partial, out)
    return out


def sum_splits(partial: torch.Tensor, out: torch.Tensor) -> None:
    """out [rows, N] = the split-K slices' float32 partial sums [rows, SPLIT, N] added in order."""
    rows, split, out_features = partial.shape
    _sum_splits[(triton.cdiv(out_features, 1024), rows)](partial, out, out_features, SPLIT=split, BLOCK=1024)


def pack_x(x: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x for the fp16x2 path: ([rows, groups, 4, G / 8] int32 fp16 pairs, [rows, groups] sums)."""
    rows, in_features = x.shape
    group_size = in_features // n_groups
    packed = torch.empty(rows, n_groups, 4, group_size // 8, dtype=torch.int32, device=x.device)
    sums = torch.empty(rows, n_groups, dtype=torch.float32, device=x.device)
    _pack_x[(n_groups, rows)](x, packed, sums, in_features, GROUP=group_size, num_warps=1)
    return packed, sums


def _key(x, words) -> tuple:
    return (x.shape[0], *words.shape, str(x.device))


def tune(x: torch.Tensor, words, scale, offset, candidates=CANDIDATES) -> dict[Config, float]:
    """Time each candidate on this weight as the decoder runs it (tuning.py) and keep the fastest
    for its shape. Microseconds per candidate; one that fails to compile, run or match is left out."""
    from chat.engine.int4 import tuning

    return tuning.tune(gemv, dequantize, _chosen, _key(x, words), x, words, scale, offset, candidates)


def chosen(x: torch.Tensor, words) -> Config | None:
    return _chosen.get(_key(x, words))
