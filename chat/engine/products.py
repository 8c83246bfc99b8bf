"""How the fast decoder computes a matrix product from the weights it keeps: an adapter, not a loop.

The decode loop (decode_loop.py) and the layout (layout.py) never call `F.linear`
themselves. They hold each product's weights as the tuple a `Products` adapter packed, and call
the adapter's `linear` on it, so dense bf16 weights, weight-only int4 and a tensor-parallel slice
of either are adapters of one loop:

- `pack(weight, bias)`: a dense `[out, in]` weight (and bias or None) -> the tuple of tensors kept;
- `linear(x, *packed)`: `x [T, in]` times that weight (plus bias), in x's dtype.

`linear` is handed to the compiled pieces as an argument: Dynamo guards on the function and
takes the tensors as inputs, so one compiled graph serves every layer.

A product over a slice of the inner dimension (a rank's share under tensor parallelism) yields a
partial sum; the function that completes it (`reduce`: a sum across ranks) and the one that joins
slices of the output dimension (`gather`: the vocabulary's logits) are the other half of the seam.
On one device both are `whole`, which returns its input: the compiled graph is then unchanged.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class Products(Protocol):
    """Packs a dense weight into what it keeps, and multiplies by it (see the module docstring)."""

    name: str

    @staticmethod
    def pack(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple: ...

    @staticmethod
    def linear(x: torch.Tensor, *packed) -> torch.Tensor: ...


class Dense:
    """The weights as they are (bf16 on a GPU, float32 on the CPU): `F.linear`."""

    name = "dense"

    @staticmethod
    def pack(weight, bias) -> tuple:
        return (weight, bias)

    @staticmethod
    def linear(x, weight, bias):
        # A plain product (not addmm with the residual): Inductor turns a one-row product into a
        # Triton reduction with what follows fused in, which streams the weight faster than
        # cuBLAS's GEMV.
        return F.linear(x, weight, bias)


def whole(x):
    """`reduce` and `gather` on one device: the product is already whole."""
    return x
