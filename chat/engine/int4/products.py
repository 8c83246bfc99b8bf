"""int4 weight-only products for the fast decoder: `Products` adapters (see products.py).

- `Int4Reference` (the CPU, and CI): keeps the saved layout (int4/weight.py) and multiplies by the
  weight dequantized in float32: the definition every kernel is checked against.
- `Int4Triton` (a CUDA GPU, the default): our GEMV (int4/gemv.py). Chosen by measurement
  (bench/int4_gemv.py, bench/int4_decode.py, docs/performance.md): on one H200 it read int4 at
  2.1-3.8 TB/s against tinygemm's 1.5-2.2, on every Falcon shape; 180B decoded at 30.5 ms/token
  against 47.4.
- `Int4TinyGemm` (a CUDA GPU): torch's built-in `_weight_int4pack_mm`, the baseline the benches
  compare with.

Each adapter packs either a dense weight (`pack`, quantizing it) or an `Int4Weight` already
quantized (`from_int4`, as the loader has them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chat.engine.int4.weight import Int4Weight, dequantize, quantize, unpack


class Int4Reference:
    """int4 weights in the saved layout; products in float32 through the dequantized weight."""

    name = "int4 (reference, float32)"

    @staticmethod
    def pack(weight, bias) -> tuple:
        return Int4Reference.from_int4(quantize(weight), bias)

    @staticmethod
    def from_int4(weight: Int4Weight, bias) -> tuple:
        return (weight.packed, weight.scale, weight.offset, bias)

    @staticmethod
    def linear(x, packed, scale, offset, bias):
        group_size = packed.shape[1] * 2 // scale.shape[1]
        w = dequantize(Int4Weight(packed, scale, offset, group_size), torch.float32)
        out = F.linear(x.float(), w, None if bias is None else bias.float())
        return out.to(x.dtype)


class Int4TinyGemm:
    """int4 weights in tinygemm's tiles; `torch.ops.aten._weight_int4pack_mm` (bf16, CUDA).

    A prompt (PROMPT_ROWS rows or more) is multiplied instead by the weight read back from the
    tiles into bf16 (int4/tinygemm_tiles.py): tinygemm's time grows with the rows.
    """

    name = "int4 (tinygemm)"
    # On 180B tinygemm took ~12 ms per prompt row (1.5 s for 128 rows, 22.6 s for 1,900), and reading
    # the tiles back in one Triton pass costs about one read of the weights plus cuBLAS's product.
    PROMPT_ROWS = 16

    @staticmethod
    def pack(weight, bias) -> tuple:
        return Int4TinyGemm.from_int4(quantize(weight), bias)

    @staticmethod
    def from_int4(weight: Int4Weight, bias) -> tuple:
        from chat.engine.int4 import tinygemm_tiles

        out_features, in_features = weight.shape
        tiles = next(t for t in (8, 4, 2) if in_features % (t * 16) == 0)
        q = unpack(weight.packed)
        # tinygemm stores (q - 8) * scale + zero.
        tiled = torch.ops.aten._convert_weight_to_int4pack(tinygemm_tiles.swap_nibbles(q), tiles)
        tinygemm_tiles.order_for(tiles, tiled, q)  # found and checked on the first weight only
        del q
        scale = weight.scale.float()
        zero = weight.offset.float() + 8 * scale
        scale_zero = torch.stack((scale, zero), dim=-1).to(torch.bfloat16).transpose(0, 1).contiguous()
        return (tiled, scale_zero, bias)

    @staticmethod
    def linear(x, tiled, scale_zero, bias):
        if x.shape[0] >= Int4TinyGemm.PROMPT_ROWS:  # a prompt (eager; the decode step never is)
            from chat.engine.int4 import tinygemm_tiles

            order = tinygemm_tiles._ORDERS.get((tiled.shape[3] * 2, str(tiled.device)))
            if order is not None:
                return F.linear(x, tinygemm_tiles.dense_weight(tiled, scale_zero, order, x.dtype), bias)
        group_size = x.shape[-1] // scale_zero.shape[0]
        out = torch.ops.aten._weight_int4pack_mm(x, tiled, group_size, scale_zero)
        return out if bias is None else out + bias


class Int4Triton:
    """int4 weights in our GEMV's layout (int4/gemv.py); each new shape tuned on its first weight."""

    name = "int4 (Triton GEMV)"

    @staticmethod
    def pack(weight, bias) -> tuple:
        return Int4Triton.from_int4(quantize(weight), bias)

    @staticmethod
    def from_int4(weight: Int4Weight, bias) -> tuple:
        from chat.engine.int4 import gemv as int4_gemv
        from chat.engine.int4 import linear  # noqa: F401 (registers falcon_chat::int4_linear)

        words, scale, offset = int4_gemv.pack(weight)
        if words.is_cuda and int4_gemv.triton is not None:
            x = torch.randn(1, weight.shape[1], dtype=scale.dtype, device=words.device)
            if int4_gemv.chosen(x, words) is None:
                int4_gemv.tune(x, words, scale, offset)
        return (words, scale, offset, bias)

    @staticmethod
    def linear(x, words, scale, offset, bias):
        out = torch.ops.falcon_chat.int4_linear(x, words, scale, offset)
        return out if bias is None else out + bias


def int4_products(device: torch.device):
    """The int4 adapter for `device`: our GEMV on a CUDA GPU (tinygemm where Triton is missing),
    the float32 reference elsewhere."""
    if torch.device(device).type != "cuda":
        return Int4Reference
    from chat.engine.int4 import gemv as int4_gemv

    return Int4Triton if int4_gemv.triton is not None else Int4TinyGemm
