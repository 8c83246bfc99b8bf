"""One rank's slice of a Falcon, read straight from the checkpoint into the fast decoder's layout.

Tensor parallelism over N ranks (parallel/ranks.py) gives each rank a share of every layer:
the fused QKV rows of its query heads (with their key and value), the MLP's first product by
rows (its share of the MLP width), and the matching columns of the two out-products, so a layer
ends in one sum across ranks (Falcon's attention and MLP run side by side). The vocabulary's
rows of the head are split too, its logits joined after. Norms and the embedding stay whole.

Query heads are shared out by whole KV groups when the KV heads divide among the ranks (40B and
180B: 8 KV heads); otherwise every rank keeps every KV head and takes a share of each group's
queries (7B: one KV head, 71 queries: 36 and 35), or, with groups smaller than the ranks, whole
groups unevenly.

A rank reads only its rows and columns of each tensor (`SafetensorsSource`); `RandomSource`
makes a model's tensors from a seed on the GPU instead (benchmarks of shapes nobody downloads).
Each product's slice is packed (quantized, for int4) as soon as it is read, so a rank holds its
packed slices plus about one tensor being read, never its share of the model in bf16.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from chat.engine.falcon_layout import FalconLayout, Layer, Unsupported, rotary_tables
from chat.engine.products import Dense, Products

Ranges = list[range]


def share(n: int, world: int, rank: int) -> range:
    """Rank `rank`'s contiguous share of `n` items: sizes differ by at most one, larger first."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


@dataclass(frozen=True)
class FalconShape:
    """The sizes that decide the layout, from a transformers FalconConfig."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layers: int
    eps: float

    @classmethod
    def from_config(cls, config) -> FalconShape:
        if config.alibi:
            raise Unsupported("ALiBi Falcon models are not supported")
        if not (config.parallel_attn or config.new_decoder_architecture):
            raise Unsupported("sequential (non-parallel) attention is not supported")
        heads = config.num_attention_heads
        kv = config.num_kv_heads if config.new_decoder_architecture or not config.multi_query else 1
        return cls(
            config.hidden_size,
            heads,
            kv,
            config.hidden_size // heads,
            config.vocab_size,
            config.num_hidden_layers,
            config.layer_norm_epsilon,
        )

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


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
    def make(cls, shape: FalconShape, rank: int, world: int) -> RankPlan:
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


# -- where the weights come from ---------------------------------------------------------------


class SafetensorsSource:
    """A model folder's weights (the engine's one reader, checkpoint.py) read onto `device`."""

    def __init__(self, folder, device, dtype):
        from transformers import AutoConfig

        from chat.engine.checkpoint import Checkpoint

        self.folder, self.device, self.dtype = Path(folder), torch.device(device), dtype
        self.config = AutoConfig.from_pretrained(self.folder)
        self.checkpoint = Checkpoint(self.folder)

    def names(self) -> set[str]:
        return self.checkpoint.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.checkpoint.shape(name)

    def read(self, name: str, rows: Ranges | None = None, columns: Ranges | None = None) -> torch.Tensor:
        return self.checkpoint.read(name, rows, columns, device=self.device, dtype=self.dtype)


class RandomSource:
    """A Falcon of `config`'s shape with seeded random weights made on `device` (benchmarks).

    Every rank draws the same whole tensor and keeps its slice, so N ranks hold one model.
    With `shapes_only`, the products' weights (the layers' four and an untied head) come back
    as meta tensors, shapes without values, for `int4_slices` to draw directly in int4: quantizing
    a Falcon-180B's bf16 weights takes many minutes (docs/performance.md).
    """

    def __init__(self, config, device, dtype, seed: int = 0, shapes_only: bool = False):
        from transformers import FalconForCausalLM

        self.config, self.device, self.dtype, self.seed = config, torch.device(device), dtype, seed
        self.shapes_only = shapes_only
        with torch.device("meta"):
            meta = FalconForCausalLM(config)
        self._shapes = {name: tuple(t.shape) for name, t in meta.state_dict().items()}
        if config.tie_word_embeddings and not shapes_only:  # drawn, the head is its own weight
            self._shapes.pop("lm_head.weight", None)

    def names(self) -> set[str]:
        return set(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def read(self, name: str, rows: Ranges | None = None, columns: Ranges | None = None) -> torch.Tensor:
        shape = self._shapes[name]
        if self.shapes_only and _is_product_weight(name):
            whole = torch.empty(shape, device="meta", dtype=self.dtype)
        elif "layernorm" in name or ".ln_" in name:
            whole = (torch.ones if name.endswith("weight") else torch.zeros)(
                shape, device=self.device, dtype=self.dtype
            )
        else:
            generator = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + _stable_hash(name))
            whole = torch.empty(shape, device=self.device, dtype=self.dtype)
            whole.normal_(0.0, self.config.initializer_range, generator=generator)
        if rows is not None:
            return torch.cat([whole[r.start : r.stop] for r in rows])
        if columns is not None:
            return torch.cat([whole[:, c.start : c.stop] for c in columns], dim=1)
        return whole


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode())  # the same in every process (Python's hash() is salted)


def _is_product_weight(name: str) -> bool:
    return name == "lm_head.weight" or (name.endswith(".weight") and any(part in name for part in _PRODUCTS))


_PRODUCTS = (".query_key_value.", ".dense.", ".dense_h_to_4h.", ".dense_4h_to_h.")


def int4_slices(products, *, search: str = "hqq", device=None, dtype=torch.bfloat16, seed: int = 0):
    """An int4 `products` adapter (int4/products.py) that packs each slice a rank reads by
    quantizing it with `search` (int4.quantize), or, for a weight that is only a shape
    (`RandomSource(shapes_only=True)`), by drawing random int4 directly on `device`."""
    from chat.engine.int4 import weight as int4

    generator = None if device is None else torch.Generator(device).manual_seed(seed)

    class Slices(products):
        @staticmethod
        def pack(weight, bias) -> tuple:
            if weight.is_meta:
                made = int4.random_int4(*weight.shape, device=device, dtype=dtype, generator=generator)
            else:
                made = int4.quantize(weight, search=search)
            return products.from_int4(made, bias)

    Slices.__name__ = Slices.__qualname__ = f"{products.__name__}Slices"
    return Slices


# -- the rank's layout ---------------------------------------------------------------------------------


def layout_from_source(
    source, rank: int, world: int, *, max_len: int, products: type[Products] = Dense
) -> FalconLayout:
    """Rank `rank`'s slice of the model in `source`, laid out for `FastDecoder.from_layout`."""
    from transformers.models.falcon.modeling_falcon import FalconRotaryEmbedding

    config = source.config
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope != "default":
        raise Unsupported(f"rope scaling {rope!r} is not supported")
    shape = FalconShape.from_config(config)
    plan = RankPlan.make(shape, rank, world)
    names = source.names()
    with torch.no_grad():
        layers = [
            _layer(source, names, f"transformer.h.{i}.", plan, shape, max_len, products)
            for i in range(shape.layers)
        ]
        embed = source.read("transformer.word_embeddings.weight")
        if "lm_head.weight" in names:
            head = source.read("lm_head.weight", rows=[plan.vocab_rows])
        else:  # tied to the embedding: a view of its rows
            head = embed[plan.vocab_rows.start : plan.vocab_rows.stop]
        if head.shape[0] < plan.vocab_per_rank:  # the last rank's share, padded to the others' size
            head = torch.cat([head, head.new_zeros(plan.vocab_per_rank - head.shape[0], head.shape[1])])
        cos, sin = rotary_tables(FalconRotaryEmbedding(config), max_len, source.device, source.dtype)
    ffn = share(source.shape("transformer.h.0.mlp.dense_h_to_4h.weight")[0], world, rank)
    return FalconLayout(
        embed=embed,
        ln_f=_norm(source, "transformer.ln_f.", shape.eps),
        lm_head=products.pack(head, None),
        layers=layers,
        cos=cos,
        sin=sin,
        products=products,
        hidden=shape.hidden,
        kv_heads=len(plan.kv_heads),
        group=len(plan.queries),
        head_dim=shape.head_dim,
        ffn=len(ffn),
        vocab=shape.vocab,
        max_len=int(max_len),
    )


def _layer(source, names, prefix, plan: RankPlan, shape: FalconShape, max_len, products) -> Layer:
    qkv, dense = prefix + "self_attention.query_key_value.", prefix + "self_attention.dense."
    h4, h4h = prefix + "mlp.dense_h_to_4h.", prefix + "mlp.dense_4h_to_h."
    ffn = [share(source.shape(h4 + "weight")[0], plan.world, plan.rank)]

    def bias(name, rows=None):
        return source.read(name + "bias", rows=rows) if name + "bias" in names else None

    # Each slice is packed as soon as it is read, and no name keeps it after (the module docstring).
    b_qkv, b_h4 = bias(qkv, plan.qkv_rows), bias(h4, ffn)
    if prefix + "ln_attn.weight" in names:  # two norms: the products stay apart
        ln_attn, ln_mlp = (
            _norm(source, prefix + "ln_attn.", shape.eps),
            _norm(source, prefix + "ln_mlp.", shape.eps),
        )
        w_in = products.pack(source.read(qkv + "weight", rows=plan.qkv_rows), b_qkv)
        w_mlp_in = products.pack(source.read(h4 + "weight", rows=ffn), b_h4)
    else:
        ln_attn, ln_mlp = _norm(source, prefix + "input_layernorm.", shape.eps), None
        b_in = torch.cat([b_qkv, b_h4]) if b_qkv is not None else None
        w_in = products.pack(
            torch.cat(
                [source.read(qkv + "weight", rows=plan.qkv_rows), source.read(h4 + "weight", rows=ffn)]
            ),
            b_in,
        )
        w_mlp_in = None
    b_out = None
    if plan.rank == 0 and dense + "bias" in names:  # added once, by one rank, before the sum
        b_out = bias(dense) + bias(h4h)
    w_out = products.pack(
        torch.cat(
            [
                source.read(dense + "weight", columns=plan.attention_columns),
                source.read(h4h + "weight", columns=ffn),
            ],
            dim=1,
        ),
        b_out,
    )
    cache = torch.zeros(len(plan.kv_heads), max_len, shape.head_dim, dtype=source.dtype, device=source.device)
    return Layer(ln_attn, ln_mlp, w_in, w_mlp_in, w_out, cache, cache.clone())


def _norm(source, prefix, eps) -> tuple:
    return (source.read(prefix + "weight"), source.read(prefix + "bias"), float(eps))
