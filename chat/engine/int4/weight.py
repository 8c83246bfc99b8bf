"""Weight-only int4: group-wise quantization, its float32 reference product, save and load.

A weight [out, in] is cut along `in` into groups of `group_size` columns; each group keeps a
scale and an offset, and every weight is `q * scale + offset` with q in 0..15 (asymmetric: the
offset is the group's low end, so a group that is all positive wastes no level). Symmetric
(offset = -8 * scale) is kept to compare; bench/int4_quality.py measured both.

The scale search picks, per group, how far to pull the range in from the group's min and max
(outliers cost one level to everyone else): a small grid of shrink ratios, keeping the one with
the least squared error ("clip"); the default, "hqq", then refines the offset by HQQ's
half-quadratic steps (an lp<1 loss that lets outliers go), with the scale fixed. On SmolLM2 it
gave the lowest perplexity of the three (bench/int4_quality.py, docs/performance.md).

Storage (what is saved and what the CPU reference reads): `packed` uint8 [out, in / 2], the low
nibble the even column; `scale` and `offset` [out, in / group_size] in the model's dtype. The GPU
kernels repack from this (int4_kernels.py); none of them changes the numbers it stands for.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GROUP_SIZES = (128, 64, 32)  # the first that divides a weight's `in` size is used
SEARCH_RATIOS = (1.0, 0.975, 0.95, 0.925, 0.9, 0.875, 0.85, 0.8)
_ROWS_PER_CHUNK_ELEMENTS = 1 << 26  # float32 scratch per chunk of rows: 256 MB


@dataclass
class Int4Weight:
    """A [out, in] weight in int4 with group-wise scale and offset (see the module docstring)."""

    packed: torch.Tensor  # uint8 [out, in // 2]
    scale: torch.Tensor  # [out, in // group_size]
    offset: torch.Tensor  # [out, in // group_size]
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.packed.shape[0], self.packed.shape[1] * 2)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.offset))

    def to(self, device) -> Int4Weight:
        return Int4Weight(
            self.packed.to(device), self.scale.to(device), self.offset.to(device), self.group_size
        )


def group_size_for(in_features: int, preferred: int = 128) -> int:
    """The largest of the allowed group sizes, at most `preferred`, that divides `in_features`."""
    for size in GROUP_SIZES:
        if size <= preferred and in_features % size == 0:
            return size
    raise ValueError(f"no int4 group size in {GROUP_SIZES} divides {in_features} columns")


def quantize(
    weight: torch.Tensor,
    group_size: int | None = None,
    *,
    symmetric: bool = False,
    search: str = "hqq",
    dtype: torch.dtype | None = None,
) -> Int4Weight:
    """int4 with a scale and offset per group; `search`: "none", "clip" (grid) or "hqq".

    Runs where `weight` is (the GPU while loading), a chunk of rows at a time.
    """
    out_features, in_features = weight.shape
    group_size = group_size or group_size_for(in_features)
    if in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide {in_features} columns")
    dtype = dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
    rows = max(1, _ROWS_PER_CHUNK_ELEMENTS // (in_features * (len(SEARCH_RATIOS) + 4)))
    parts = [
        _quantize_rows(weight[r : r + rows], group_size, symmetric, search)
        for r in range(0, out_features, rows)
    ]
    q = torch.cat([p[0] for p in parts])
    scale = torch.cat([p[1] for p in parts]).to(dtype)
    offset = torch.cat([p[2] for p in parts]).to(dtype)
    return Int4Weight(pack(q), scale, offset, group_size)


def _quantize_rows(weight, group_size: int, symmetric: bool, search: str):
    w = weight.float().reshape(weight.shape[0], -1, group_size)  # [rows, groups, group_size]
    ratios = SEARCH_RATIOS if search in ("clip", "hqq") else (1.0,)
    best = None
    for ratio in ratios:
        scale, offset = _range(w, ratio, symmetric)
        error = (_fake_quantize(w, scale, offset) - w).square().sum(-1)
        if best is None:
            best = (error, scale, offset)
        else:
            better = error < best[0]
            best = tuple(
                torch.where(better, new, old) for new, old in zip((error, scale, offset), best, strict=True)
            )
    _, scale, offset = best
    if search == "hqq" and not symmetric:
        offset = _hqq_offset(w, scale, offset)
    q = _levels(w, scale, offset)
    return q.reshape(weight.shape).to(torch.uint8), scale, offset


def _range(w, ratio: float, symmetric: bool):
    """Scale and offset that map 0..15 onto the group's range pulled in by `ratio`."""
    if symmetric:
        scale = (w.abs().amax(-1) * ratio / 7.5).clamp_min(1e-10)  # levels -8..7 around zero
        return scale, -8 * scale
    low, high = w.amin(-1) * ratio, w.amax(-1) * ratio
    scale = ((high - low) / 15).clamp_min(1e-10)
    return scale, low


def _levels(w, scale, offset):
    return ((w - offset[..., None]) / scale[..., None]).round_().clamp_(0, 15)


def _fake_quantize(w, scale, offset):
    return _levels(w, scale, offset) * scale[..., None] + offset[..., None]


def _hqq_offset(
    w, scale, offset, iterations: int = 20, p: float = 0.7, beta: float = 10.0, kappa: float = 1.01
):
    """HQQ's offset refinement (Badri & Shaji, 2023): alternate a sparse error term under an lp
    norm (p < 1) with the closed-form offset; keep the best offset seen per group."""
    s, o = scale[..., None], offset[..., None]
    best_error = (_fake_quantize(w, scale, offset) - w).square().sum(-1)
    best = offset.clone()
    for _ in range(iterations):
        q = ((w - o) / s).round().clamp(0, 15)
        residual = w - (q * s + o)
        sparse = residual.sign() * F.relu(residual.abs() - residual.abs().clamp_min(1e-12).pow(p - 1) / beta)
        o = (w - sparse - q * s).mean(-1, keepdim=True)
        beta *= kappa
        error = (_fake_quantize(w, scale, o[..., 0]) - w).square().sum(-1)
        better = error < best_error
        best = torch.where(better, o[..., 0], best)
        best_error = torch.where(better, error, best_error)
    return best


def from_zero_points(
    packed: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, source_group: int, group_size: int
) -> Int4Weight:
    """The weight `scale * (q - zero)`, exactly, as GPTQ and AWQ checkpoints define theirs.

    `packed` holds q as `pack` does; `zero` (integers) and `scale` (fp16 or bf16) are [groups, out],
    one row per `source_group` input columns (the last group may be short); `group_size` divides
    `source_group`, so each of its groups repeats one source group's scale and offset. Exact: the
    offset `-zero * scale` and `q * scale` are float32 products of a 5-bit integer and an fp16 (or
    bf16) mantissa, and so is their sum, the exact result: float32 holds it. The offset is kept in the
    scale's dtype where that is exact too (symmetric: -8 * scale), else in float32.
    """
    in_features = packed.shape[1] * 2
    take = torch.arange(0, in_features, group_size, device=packed.device) // source_group
    scale = scale.t()[:, take].contiguous()
    offset = -(zero.t()[:, take].float() * scale.float())
    if torch.equal(offset.to(scale.dtype).float(), offset):
        offset = offset.to(scale.dtype)
    return Int4Weight(packed, scale, offset, group_size)


def concat(weights: list[Int4Weight], dim: int) -> Int4Weight:
    """Weights side by side as one: dim 0 stacks rows (outputs), dim 1 joins columns (inputs; each
    part's columns a whole number of groups). Changes no weight: groups stay within their part."""
    group = weights[0].group_size
    if any(w.group_size != group for w in weights):
        raise ValueError(f"cannot join int4 weights of group sizes {[w.group_size for w in weights]}")
    if len(weights) == 1:
        return weights[0]
    scale_dtype = functools.reduce(torch.promote_types, [w.scale.dtype for w in weights])
    offset_dtype = functools.reduce(torch.promote_types, [w.offset.dtype for w in weights])
    return Int4Weight(
        torch.cat([w.packed for w in weights], dim),
        torch.cat([w.scale.to(scale_dtype) for w in weights], dim),
        torch.cat([w.offset.to(offset_dtype) for w in weights], dim),
        group,
    )


def take(
    weight: Int4Weight, rows: list[range] | None = None, columns: list[range] | None = None
) -> Int4Weight:
    """Some of a weight's rows, or of its columns (ranges of whole groups), joined in order."""
    if rows is not None:
        parts = [
            (weight.packed[r.start : r.stop], weight.scale[r.start : r.stop], weight.offset[r.start : r.stop])
            for r in rows
        ]
        dim = 0
    elif columns is not None:
        group = weight.group_size
        if any(c.start % group or c.stop % group for c in columns):
            raise ValueError(f"columns {columns} are not whole groups of {group}")
        parts = [
            (
                weight.packed[:, c.start // 2 : c.stop // 2],
                weight.scale[:, c.start // group : c.stop // group],
                weight.offset[:, c.start // group : c.stop // group],
            )
            for c in columns
        ]
        dim = 1
    else:
        return weight
    return concat([Int4Weight(*part, weight.group_size) for part in parts], dim)


def pad_rows(weight: Int4Weight, rows: int) -> Int4Weight:
    """`weight` with zero rows added up to `rows` (scale and offset 0: every added weight is 0)."""
    extra = rows - weight.shape[0]
    return Int4Weight(
        torch.cat([weight.packed, weight.packed.new_zeros(extra, weight.packed.shape[1])]),
        torch.cat([weight.scale, weight.scale.new_zeros(extra, weight.scale.shape[1])]),
        torch.cat([weight.offset, weight.offset.new_zeros(extra, weight.offset.shape[1])]),
        weight.group_size,
    )


def regroup(weight: Int4Weight, group_size: int) -> Int4Weight:
    """The same weights in groups of `group_size`, which divides the weight's own: each group's
    scale and offset repeated (no weight changes)."""
    if group_size == weight.group_size:
        return weight
    if weight.group_size % group_size:
        raise ValueError(f"groups of {weight.group_size} cannot be read as groups of {group_size}")
    times = weight.group_size // group_size
    return Int4Weight(
        weight.packed,
        weight.scale.repeat_interleave(times, dim=1),
        weight.offset.repeat_interleave(times, dim=1),
        group_size,
    )


def random_int4(rows: int, cols: int, *, device, dtype=torch.bfloat16, generator=None) -> Int4Weight:
    """A random [rows, cols] weight made directly in int4, no dense weight quantized: benchmarks
    of shapes too large to quantize quickly (Falcon-180B). Levels uniform in 0..15 around zero
    (offset -8 * scale), scales in 0.001..0.002."""
    group = group_size_for(cols)
    packed = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, device=device, generator=generator)
    scale = torch.rand(rows, cols // group, device=device, generator=generator).add_(0.5).mul_(0.002)
    return Int4Weight(packed, scale.to(dtype), (-8 * scale).to(dtype), group)


def pack(q: torch.Tensor) -> torch.Tensor:
    """uint8 levels [out, in] -> two per byte, the even column in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack`: uint8 levels [out, in]."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def dequantize(weight: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [out, in] weight the int4 numbers stand for, computed in float32."""
    out_features, in_features = weight.shape
    q = unpack(weight.packed).float().reshape(out_features, -1, weight.group_size)
    w = q * weight.scale.float()[..., None] + weight.offset.float()[..., None]
    return w.reshape(out_features, in_features).to(dtype)


def reference_linear(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T with W dequantized in float32: the product every int4 kernel must match."""
    out = F.linear(x.float(), dequantize(weight), None if bias is None else bias.float())
    return out.to(x.dtype)
