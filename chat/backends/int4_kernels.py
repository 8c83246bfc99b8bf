"""int4 products on a GPU: each kernel's layout made from an `Int4Weight`, and the product.

Three kernels, measured side by side by bench/int4_kernels.py (docs/performance.md):
- "tinygemm": torch's built-in `_weight_int4pack_mm` (tensor-core tiles, bf16 only). It stores
  `(q - 8) * scale + zero`, so zero = offset + 8 * scale, one bf16 rounding.
- "gemlite": GemLite's Triton kernels (HQQ's `(q - zero) * scale`, zero = -offset / scale);
  its layer products missed the float32 reference by 2-3% on the H200 (bench), so unused.
- "triton": our own GEMV (below) over interleaved nibbles; correct, but read at ~1.1 TB/s.
The fast decoder uses tinygemm (int4_products.py). Each takes x [rows, in] in bf16 and returns
[rows, out] in bf16. The device needs torchao/GemLite only for the bench: carry them as wheels.
"""

from __future__ import annotations

import torch

from .int4 import Int4Weight, unpack

KERNELS = ("triton", "tinygemm", "gemlite")


def make_linear(weight: Int4Weight, kernel: str):
    """A callable x -> x @ W.T for `weight` (on the GPU) through `kernel`."""
    if kernel == "tinygemm":
        return TinyGemm(weight)
    if kernel == "gemlite":
        return _gemlite(weight)
    if kernel == "triton":
        return TritonGemv(weight)
    raise ValueError(f"unknown int4 kernel {kernel!r}; one of {KERNELS}")


class TinyGemm:
    """torch.ops.aten._weight_int4pack_mm with its tile layout (int4_products.Int4TinyGemm)."""

    def __init__(self, weight: Int4Weight):
        from .int4_products import Int4TinyGemm

        self.packed = Int4TinyGemm.from_int4(weight, None)
        self.linear = Int4TinyGemm.linear

    def __call__(self, x):
        return self.linear(x, *self.packed)


def _gemlite(weight: Int4Weight):
    import os

    import gemlite
    from gemlite import DType, GemLiteLinear

    if "H200" in torch.cuda.get_device_name():  # same chip as the H100; GemLite ships no H200 table
        gemlite.load_config(os.path.join(os.path.dirname(gemlite.__file__), "configs", "h100.json"))

    out_features, in_features = weight.shape
    linear = GemLiteLinear(4, group_size=weight.group_size, in_features=in_features, out_features=out_features,
                           input_dtype=DType.BF16, output_dtype=DType.BF16)  # fmt: skip
    scale = weight.scale.to(torch.bfloat16)
    # HQQ's zero point, kept in float32: rounded to bf16 it moved every weight of a group by up
    # to 2**-8 of its zero (a relative error of 4-6% in the product, measured).
    zero = -weight.offset.float() / weight.scale.float()
    linear.pack(unpack(weight.packed), scale, zero, None)
    return linear


# -- our own GEMV -------------------------------------------------------------------------------


def interleave(weight: Int4Weight) -> torch.Tensor:
    """int32 words [out, in / 8]: in each group of G columns, word t holds columns t + i * G / 8
    for i = 0..7 (nibble i), so the kernel reads x for one nibble as a contiguous run."""
    out_features, in_features = weight.shape
    words = weight.group_size // 8
    q = unpack(weight.packed).to(torch.int32).view(out_features, -1, 8, words).transpose(2, 3)
    packed = torch.zeros(q.shape[:-1], dtype=torch.int32, device=q.device)
    for i in range(8):
        packed |= q[..., i] << (4 * i)  # bit 31 wraps to the sign: read back with masks only
    return packed.reshape(out_features, in_features // 8).contiguous()


_gemv_kernel = None


def _build_kernel(tuned: bool = True):
    import triton
    import triton.language as tl

    configs = [
        triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
        for n, w, s in (
            (16, 4, 1),
            (32, 4, 1),
            (64, 4, 1),
            (32, 8, 1),
            (64, 8, 1),
            (32, 4, 3),
            (64, 8, 3),
            (128, 8, 2),
        )
    ]

    @triton.jit
    def gemv(x_ptr, w_ptr, s_ptr, o_ptr, out_ptr, N, K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
        # One group of GROUP columns per iteration: a [BLOCK_N, GROUP / 8] tile of int32 words.
        # A nibble OR'd into the mantissa of 2**23 (0x4B000000) is the float 2**23 + q * 16**i,
        # exact: one logic op and one subtraction per weight, not a slow int->float conversion;
        # x is pre-scaled by 16**-i to match. sum((q*s + o) * x) = s * sum(q * x) + o * sum(x).
        row_block = tl.program_id(0)
        batch = tl.program_id(1)
        words: tl.constexpr = GROUP // 8
        n_groups = K // GROUP
        rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        t = tl.arange(0, words)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        x_row = x_ptr + batch * K
        w_rows = w_ptr + rows[:, None].to(tl.int64) * (K // 8) + t[None, :]
        magic = 8388608.0
        for g in range(0, n_groups):
            w = tl.load(w_rows + g * words, mask=row_ok[:, None], other=0)
            upper = w >> 20
            dots = tl.zeros([BLOCK_N, words], dtype=tl.float32)
            x_sum = tl.zeros([words], dtype=tl.float32)
            for i in tl.static_range(8):
                x_i = tl.load(x_row + g * GROUP + i * words + t).to(tl.float32)
                x_sum += x_i
                if i < 5:
                    bits = (w & (15 << (4 * i))) | 0x4B000000
                    x_i = x_i * (1.0 / (16**i))
                else:
                    bits = (upper & (15 << (4 * (i - 5)))) | 0x4B000000
                    x_i = x_i * (1.0 / (16 ** (i - 5)))
                dots += (bits.to(tl.float32, bitcast=True) - magic) * x_i[None, :]
            s = tl.load(s_ptr + rows * n_groups + g, mask=row_ok, other=0.0).to(tl.float32)
            o = tl.load(o_ptr + rows * n_groups + g, mask=row_ok, other=0.0).to(tl.float32)
            acc += s * tl.sum(dots, axis=1) + o * tl.sum(x_sum, axis=0)
        tl.store(out_ptr + batch * N + rows, acc.to(out_ptr.dtype.element_ty), mask=row_ok)

    return triton.autotune(configs=configs, key=["N", "K"])(gemv) if tuned else gemv


def gemv(x, words, scale, offset, block_n: int | None = None):
    """x [rows, in] times the interleaved int4 weight (`interleave`), one program row per x row.

    `block_n` skips autotuning (Triton's interpreter, on the CPU, has no timer to tune with).
    """
    global _gemv_kernel
    if _gemv_kernel is None:
        _gemv_kernel = _build_kernel()
    import triton

    kernel, fixed = _gemv_kernel, {}
    if block_n is not None:
        kernel, fixed = _build_kernel(tuned=False), {"BLOCK_N": block_n}

    x = x.contiguous()
    rows, in_features = x.shape
    out_features = words.shape[0]
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(out_features, meta["BLOCK_N"]), rows)  # noqa: E731
    kernel[grid](
        x, words, scale, offset, out, out_features, in_features, GROUP=in_features // scale.shape[1], **fixed
    )
    return out


class TritonGemv:
    """Our GEMV over the interleaved layout; scale and offset as saved."""

    def __init__(self, weight: Int4Weight):
        self.words, self.scale, self.offset = interleave(weight), weight.scale, weight.offset

    def __call__(self, x):
        return gemv(x, self.words, self.scale, self.offset)


def deinterleave(words: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of `interleave`: uint8 levels [out, in]."""
    out_features = words.shape[0]
    per_group = words.view(out_features, -1, group_size // 8)
    nibbles = torch.stack([(per_group >> (4 * i)) & 15 for i in range(8)], dim=2)  # [out, groups, 8, words]
    return nibbles.reshape(out_features, -1).to(torch.uint8)


@torch.library.custom_op("falcon_chat::int4_linear", mutates_args=())
def int4_linear(
    x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """x @ W.T for the interleaved int4 weight: our GEMV for a few rows (decoding), else the
    weight dequantized to x's dtype and one dense product (a prompt: the GEMV would read the
    weight once per row). An opaque op to torch.compile: Dynamo does not trace the autotuner."""
    if x.shape[0] <= 4:
        return gemv(x, words, scale, offset)
    group_size = x.shape[1] // scale.shape[1]
    q = deinterleave(words, group_size).view(words.shape[0], -1, group_size)
    w = (q.to(x.dtype) * scale[..., None].to(x.dtype) + offset[..., None].to(x.dtype)).view(
        words.shape[0], -1
    )
    return torch.nn.functional.linear(x, w)


@int4_linear.register_fake
def _int4_linear_shape(x, words, scale, offset):
    return x.new_empty(x.shape[0], words.shape[0])
