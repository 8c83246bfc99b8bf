"""The int4 product the fast decoder calls, by the number of rows: which kernel multiplies them.

- one row (a token): our GEMV (gemv.py);
- 2-15 rows (a speculative verify step): the rows product (rows.py), which reads each weight
  tile once for all rows; each row count is tuned on first use, and where no configuration runs
  on this GPU the per-row GEMV serves instead;
- 16 rows or more (a prompt): one dense product over the weight read back once.

An opaque op to torch.compile (`falcon_chat::int4_linear`): Dynamo does not trace Triton's
launcher or the tuning tables.
"""

from __future__ import annotations

import torch

from chat.engine.int4 import gemv, rows

PROMPT_ROWS = 16  # from this many rows on, one dense product over the weight read back once


@torch.library.custom_op("falcon_chat::int4_linear", mutates_args=())
def int4_linear(
    x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """x @ W.T for gemv.pack's weight (see the module docstring)."""
    if gemv.triton is None or not x.is_cuda or x.shape[0] >= PROMPT_ROWS:
        return (x @ gemv.dequantize(words, scale, offset, x.dtype)).to(x.dtype)
    if x.shape[0] > 1 and rows.usable(x, words, scale, offset):
        return rows.gemm_rows(x, words, scale, offset)
    return gemv.gemv(x, words, scale, offset)


@int4_linear.register_fake
def _int4_linear_shape(x, words, scale, offset):
    return x.new_empty(x.shape[0], words.shape[1])
