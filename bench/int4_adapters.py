"""int4 products on a GPU: each kernel's layout made from an `Int4Weight`, and the product.

Three kernels, measured side by side by bench/int4_kernels.py (docs/performance.md):
- "tinygemm": torch's built-in `_weight_int4pack_mm` (tensor-core tiles, bf16 only). It stores
  `(q - 8) * scale + zero`, so zero = offset + 8 * scale, one bf16 rounding.
- "gemlite": GemLite's Triton kernels (HQQ's `(q - zero) * scale`, zero = -offset / scale);
  its layer products missed the float32 reference by 2-3% on the H200 (bench), so unused.
- "triton": our own GEMV (int4/gemv.py), tuned per shape.
The fast decoder's choice is in int4/products.py. Each takes x [rows, in] in bf16 and returns
[rows, out] in bf16. The device needs torchao/GemLite only for the bench: carry them as wheels.
"""

from __future__ import annotations

import torch

from chat.engine.int4.weight import Int4Weight, unpack

KERNELS = ("triton", "tinygemm", "gemlite")


def make_linear(weight: Int4Weight, kernel: str):
    """A callable x -> x @ W.T for `weight` (on the GPU) through `kernel`."""
    from chat.engine.int4.products import Int4TinyGemm, Int4Triton

    if kernel == "tinygemm":
        return _Adapted(Int4TinyGemm, weight)
    if kernel == "gemlite":
        return _gemlite(weight)
    if kernel == "triton":  # tuned on this weight's shape at first sight
        return _Adapted(Int4Triton, weight)
    raise ValueError(f"unknown int4 kernel {kernel!r}; one of {KERNELS}")


class _Adapted:
    """An int4_products adapter's product for one weight, as a callable x -> x @ W.T."""

    def __init__(self, adapter, weight: Int4Weight):
        self.packed = adapter.from_int4(weight, None)
        self.linear = adapter.linear

    def __call__(self, x):
        return self.linear(x, *self.packed)


def _gemlite(weight: Int4Weight):
    import os

    import gemlite
    from gemlite import DType, GemLiteLinear

    if "H200" in torch.cuda.get_device_name():  # same chip as the H100; GemLite ships no H200 table
        gemlite.load_config(os.path.join(os.path.dirname(gemlite.__file__), "configs", "h100.json"))

    out_features, in_features = weight.shape
    linear = GemLiteLinear(
        4,
        group_size=weight.group_size,
        in_features=in_features,
        out_features=out_features,
        input_dtype=DType.BF16,
        output_dtype=DType.BF16,
    )
    scale = weight.scale.to(torch.bfloat16)
    # HQQ's zero point, kept in float32: rounded to bf16 it moved every weight of a group by up
    # to 2**-8 of its zero (a relative error of 4-6% in the product, measured).
    zero = -weight.offset.float() / weight.scale.float()
    linear.pack(unpack(weight.packed), scale, zero, None)
    return linear
