"""The int4 layout's read rate alone: the GEMV's tiles loaded and summed, no arithmetic on them.

bench/int4_gemv.py prints it beside our GEMV ("the same tiles, only read"): the gap between the two
is what the GEMV's arithmetic costs. Lived in the product kernel as a `LOAD_ONLY` switch until
issue #22 moved what only benchmarks use out of the product package.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _read_tiles(w_ptr, out_ptr, N, K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
    # The GEMV's grid and tiles ([BLOCK_N, GROUP / 8] words of one group), summed as integers.
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    words: tl.constexpr = GROUP // 8
    n_groups = K // GROUP
    groups_per_split = (n_groups + SPLIT - 1) // SPLIT
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t = tl.arange(0, words)
    tile = w_ptr + cols[:, None] * words + t[None, :]
    total = tl.zeros([BLOCK_N, words], dtype=tl.int32)
    for j in range(0, groups_per_split):
        g = pid_k * groups_per_split + j
        total += tl.load(
            tile + g.to(tl.int64) * N * words, mask=(cols < N)[:, None] & (g < n_groups), other=0
        )
    tl.store(out_ptr + pid_k * N + cols, tl.sum(total, axis=1).to(tl.float32), mask=cols < N)


def read_tiles(x: torch.Tensor, words, scale, offset, config) -> torch.Tensor:
    """Reads `words` as gemv(x, words, scale, offset, config) would (scales and x are not read)."""
    n_groups, out_features, _ = words.shape
    split = triton.cdiv(n_groups, triton.cdiv(n_groups, min(config.split, n_groups)))
    out = torch.empty(split, out_features, dtype=torch.float32, device=words.device)
    _read_tiles[(triton.cdiv(out_features, config.block_n), split)](
        words,
        out,
        out_features,
        x.shape[1],
        GROUP=x.shape[1] // n_groups,
        BLOCK_N=config.block_n,
        SPLIT=split,
        num_warps=config.warps,
        num_stages=config.stages,
    )
    return out
