"""A few rows of x times an int4 weight, reading each weight tile once for all the rows.

A speculative verify step multiplies k + 1 rows (2 to 8) by every weight. Our GEMV (gemv.py)
runs one program per row, so each row reads the weights again: 8 rows cost ~8 reads. Here a
program takes one tile of the weight (BLOCK_N outputs x one group of G inputs), turns its levels
into numbers once, and multiplies them by every row on the tensor cores: `tl.dot(levels [BLOCK_N,
G], x [G, 16])`, the weight as the MMA's first operand (Hopper's wgmma may take it from registers)
and the rows, padded to 16, as the second. At batch 1 the tensor cores' arithmetic is nearly free;
the cost per weight is the few instructions that turn nibbles into bf16.

Each output row is computed the same way whatever the number of rows (a row's products and their
order in the MMA do not depend on the other rows; padding rows are zero), so the one-token step
and a verify step through this kernel give the same bits for the same row.

Layout: gemv.py's (`pack`: int32 words [groups, out, G / 8], word t of a group holding columns
t + i * G / 8 in its nibble i; scale and offset [groups, out]). Broadcasting the 8 nibble shifts
over a tile's words gives [BLOCK_N, 8, G / 8], whose flattening is the group's columns in order,
so x is read as it is. The group's scale multiplies its products once and the offset adds
offset * sum(x): sum((q * s + o) * x) = s * sum(q * x) + o * sum(x).

Which (BLOCK_N, SPLIT, warps, stages) is fastest depends on the shape, the rows and the GPU:
`tune` times the candidates on the weight at hand, per number of rows (bench/int4_rows.py prints
the sweep against our GEMV, tinygemm and bf16 cuBLAS).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chat.engine.int4 import gemv as int4_gemv

triton = int4_gemv.triton
if triton is not None:
    import triton.language as tl

ROWS_BLOCK = 16  # rows padded to the MMA's smallest side


@dataclass(frozen=True)
class RowsConfig:
    block_n: int
    split: int
    warps: int
    stages: int
    biased: bool = True  # bf16 levels as 128 + q straight from the bits (else through float32)

    def __str__(self) -> str:
        return f"rows n{self.block_n} s{self.split} w{self.warps} st{self.stages}" + (
            "" if self.biased else " f32"
        )


CANDIDATES = tuple(
    RowsConfig(*c)
    for c in (
        (64, 4, 4, 3),
        (128, 4, 4, 3),
        (64, 8, 4, 3),
        (128, 8, 4, 3),
        (64, 16, 4, 3),
        (128, 2, 4, 3),
        (256, 4, 8, 3),
        (128, 4, 8, 4),
        (64, 2, 4, 4),
        (64, 1, 4, 3),
    )
)
DEFAULT = RowsConfig(64, 4, 4, 3)
_chosen: dict[tuple, RowsConfig] = {}
_unusable: set[tuple] = set()


if triton is not None:

    @triton.jit
    def _rows(
        x_ptr,
        w_ptr,
        s_ptr,
        o_ptr,
        out_ptr,
        M,
        N,
        K,
        GROUP: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_M: tl.constexpr,
        SPLIT: tl.constexpr,
        RAGGED: tl.constexpr,
        FLOAT32: tl.constexpr,
        BIASED: tl.constexpr,
    ):
        # One program: BLOCK_N outputs, one slice of the groups, every row.
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        words: tl.constexpr = GROUP // 8
        n_groups = K // GROUP
        groups_per_split = (n_groups + SPLIT - 1) // SPLIT
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        rows = tl.arange(0, BLOCK_M)
        row_ok = rows < M
        t = tl.arange(0, words)
        shifts = 4 * tl.arange(0, 8)
        inputs = tl.arange(0, GROUP)
        first = pid_k * groups_per_split
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        w_tile = w_ptr + cols[:, None] * words + t[None, :]
        x_rows = x_ptr + rows[:, None].to(tl.int64) * K + inputs[None, :]
        for j in range(0, groups_per_split):
            g = first + j
            ok = col_ok & (g < n_groups) if RAGGED else col_ok
            in_range = (g < n_groups) if RAGGED else True
            w = tl.load(w_tile + g.to(tl.int64) * N * words, mask=ok[:, None], other=0)
            nibbles = tl.reshape((w[:, None, :] >> shifts[None, :, None]) & 15, (BLOCK_N, GROUP))
            x = tl.load(x_rows + g * GROUP, mask=row_ok[:, None] & in_range, other=0.0)
            s = tl.load(s_ptr + g.to(tl.int64) * N + cols, mask=ok, other=0.0).to(tl.float32)
            o = tl.load(o_ptr + g.to(tl.int64) * N + cols, mask=ok, other=0.0).to(tl.float32)
            x_sum = tl.sum(x.to(tl.float32), axis=1)  # [BLOCK_M]
            if BIASED:  # the bf16 whose bits are 0x4300 | q is 128 + q: no subtraction; the extra
                # 128 * sum(x) is taken out through the offset
                levels = (nibbles | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
                o = o - 128.0 * s
            else:  # a nibble OR'd into the mantissa of 2**23, less 2**23: q in float32
                levels = (nibbles | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            if FLOAT32:  # float32 x (the CPU, Triton's interpreter): float32 products
                dots = tl.dot(levels.to(tl.float32), tl.trans(x.to(tl.float32)), input_precision="ieee")
            else:  # levels (128 + q too) and bf16 x are exact in bf16; products summed in float32
                dots = tl.dot(levels.to(tl.bfloat16), tl.trans(x.to(tl.bfloat16)))
            acc += dots * s[:, None] + o[:, None] * x_sum[None, :]
        out = rows[None, :].to(tl.int64) * N + cols[:, None]  # acc is [outputs, rows]
        mask = col_ok[:, None] & row_ok[None, :]
        if SPLIT == 1:
            tl.store(out_ptr + out, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:  # float32 partial sums [rows, SPLIT, N], added by gemv's _sum_splits
            partial = (rows[None, :].to(tl.int64) * SPLIT + pid_k) * N + cols[:, None]
            tl.store(out_ptr + partial, acc, mask=mask)


def gemm_rows(x: torch.Tensor, words, scale, offset, config: RowsConfig | None = None) -> torch.Tensor:
    """x [rows <= 16, in] @ W.T for gemv.pack's weight: [rows, out] in x's dtype.

    Without `config`, the one `tune` chose for this shape and number of rows (DEFAULT before)."""
    if triton is None:
        raise RuntimeError("the int4 rows product needs Triton")
    x = x.contiguous()
    rows, in_features = x.shape
    if rows > ROWS_BLOCK:
        raise ValueError(f"gemm_rows takes at most {ROWS_BLOCK} rows, not {rows}")
    n_groups, out_features, _ = words.shape
    config = config or _chosen.get(_key(x, words), DEFAULT)
    per_split = triton.cdiv(n_groups, min(config.split, n_groups))
    split = triton.cdiv(n_groups, per_split)  # no empty slice; the last may be shorter
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    partial = (
        None if split == 1 else torch.empty(rows, split, out_features, dtype=torch.float32, device=x.device)
    )
    _rows[(triton.cdiv(out_features, config.block_n), split)](
        x,
        words,
        scale,
        offset,
        out if split == 1 else partial,
        rows,
        out_features,
        in_features,
        GROUP=in_features // n_groups,
        BLOCK_N=config.block_n,
        BLOCK_M=ROWS_BLOCK,
        SPLIT=split,
        RAGGED=n_groups % split != 0,
        FLOAT32=x.dtype == torch.float32,
        BIASED=config.biased,
        num_warps=config.warps,
        num_stages=config.stages,
    )
    if split > 1:
        int4_gemv.sum_splits(partial, out)
    return out


def _key(x, words) -> tuple:
    return ("rows", x.shape[0], *words.shape, str(x.device))


def tune(x: torch.Tensor, words, scale, offset, candidates=CANDIDATES) -> dict[RowsConfig, float]:
    """Time each candidate on this weight and these rows as the decoder runs them (tuning.py); keep
    the fastest for the shape. Microseconds per candidate; one that fails is left out."""
    from chat.engine.int4 import tuning

    return tuning.tune(
        gemm_rows, int4_gemv.dequantize, _chosen, _key(x, words), x, words, scale, offset, candidates
    )


def chosen(x: torch.Tensor, words) -> RowsConfig | None:
    return _chosen.get(_key(x, words))


def usable(x: torch.Tensor, words, scale, offset) -> bool:
    """Whether the rows product serves these rows and this shape: tuned on first use (in the
    decoder's warm-up, before its graphs are captured); False where no candidate runs and matches
    on this GPU, or where a shape first appears during a capture (the per-row GEMV then serves)."""
    key = _key(x, words)
    if key not in _chosen and key not in _unusable:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
        if not tune(x, words, scale, offset):
            _unusable.add(key)
    return key in _chosen
