"""Which rows and columns of each weight one rank keeps under tensor parallelism (`RankPlan`).

Tensor parallelism over N ranks (parallel/ranks.py) gives each rank a share of every layer:
the fused QKV rows of its query heads (with their key and value), the MLP's first product by
rows (its share of the MLP width), and the matching columns of the out-products, so attention
and the MLP each end in one sum across ranks (one sum a layer for Falcon, whose attention and MLP
run side by side; two for Llama's). The vocabulary's rows of the head are split too, its logits
joined after. Norms and the embedding stay whole. weights.py reads each rank's share by this
plan; one device is the plan of one rank.

Query heads are shared out by whole KV groups when the KV heads divide among the ranks (40B and
180B: 8 KV heads); otherwise every rank keeps every KV head and takes a share of each group's
queries (7B: one KV head, 71 queries: 36 and 35), or, with groups smaller than the ranks, whole
groups unevenly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chat.engine.layout import Unsupported

if TYPE_CHECKING:
    from chat.engine.families import Shape

Ranges = list[range]


def share(n: int, world: int, rank: int) -> range:
    """Rank `rank`'s contiguous share of `n` items: sizes differ by at most one, larger first."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


@dataclass(frozen=True)
class RankPlan:
    """Which rows and columns rank `rank` of `world` keeps (see the module docstring)."""

    rank: int
    world: int
    kv_heads: range  # KV heads kept
    queries: range  # queries kept within each kept KV group
    qkv_rows: Ranges  # rows of the fused QKV weight, in the layout's order
    attention_columns: Ranges  # matching columns of the attention's out-product
    vocab_rows: range  # rows of the head; padded to `vocab_per_rank` with zeros
    vocab_per_rank: int

    @classmethod
    def make(cls, shape: Shape, rank: int, world: int) -> RankPlan:
        group, d = shape.group, shape.head_dim
        if shape.kv_heads % world == 0:
            kv_heads, queries = share(shape.kv_heads, world, rank), range(group)
        elif group >= world:
            kv_heads, queries = range(shape.kv_heads), share(group, world, rank)
        elif shape.kv_heads >= world:  # whole groups, some ranks one more than others
            kv_heads, queries = share(shape.kv_heads, world, rank), range(group)
        else:
            raise Unsupported(
                f"{shape.heads} query heads in {shape.kv_heads} groups cannot be split {world} ways"
            )
        qkv_rows, columns = [], []
        for head in kv_heads:
            base = head * (group + 2) * d
            qkv_rows += [
                range(base + queries.start * d, base + queries.stop * d),
                range(base + group * d, base + (group + 2) * d),
            ]
            columns.append(range((head * group + queries.start) * d, (head * group + queries.stop) * d))
        per_rank = math.ceil(shape.vocab / world)
        vocab_rows = range(min(shape.vocab, rank * per_rank), min(shape.vocab, (rank + 1) * per_rank))
        return cls(rank, world, kv_heads, queries, _merge(qkv_rows), _merge(columns), vocab_rows, per_rank)


def _merge(ranges: Ranges) -> Ranges:
    """Adjacent ranges as one (whole KV groups make one range per rank: one read)."""
    merged: Ranges = []
    for r in ranges:
        if merged and merged[-1].stop == r.start:
            merged[-1] = range(merged[-1].start, r.stop)
        else:
            merged.append(r)
    return merged
