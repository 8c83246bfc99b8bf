"""Where the fast decoder's weights come from, and the one function that lays them out: `lay_out`.

A source answers for tensors by their checkpoint names:
- `ModelSource`: a transformers model in memory (the app's `--decoder fast|auto` path, tests);
- `CheckpointSource`: a model folder (checkpoint.py, the engine's one reader), dense, GPTQ or AWQ
  4-bit (int4/checkpoints.py), or our own int4 folder (int4/saved.py);
- benchmarks bring their own (bench/random_weights.py: seeded random weights of a real shape).

`lay_out` asks the model's family (families.py) where each layer's weights are and how they join,
takes this process's rows and columns of each (tensor parallelism: parallel/shards.py's plan; one
device: all of them), and packs each product with a `products` adapter (products.py). With
`quantize`, every product ends in int4: a dense weight is quantized (int4/weight.py) as soon as it
is read, in groups that never straddle the seam between two joined weights; a 4-bit checkpoint's
weight is converted without loss. So a process holds its packed products plus about one weight
being read, never the model in bf16: a rank only its share, `--quantize int4` about one layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from chat.engine.families import Part, Product, Shape, family_of
from chat.engine.layout import Layer, Layout, Unsupported, rotary_tables
from chat.engine.parallel.shards import RankPlan, share
from chat.engine.products import Dense, Products

Ranges = list[range]


# -- sources ---------------------------------------------------------------------------------------


class ModelSource:
    """A transformers model on one device; its products' modules end up viewing the fused weights
    where a product joins whole weights (so memory does not grow and `generate` still works)."""

    def __init__(self, model):
        config = model.config
        if getattr(model, "is_quantized", False) or getattr(config, "quantization_config", None):
            raise Unsupported("quantized weights are not supported")
        self.config = config
        self._parameters = dict(model.named_parameters(remove_duplicate=False))
        devices = {p.device for p in self._parameters.values()}
        if len(devices) != 1:
            raise Unsupported(f"model spans {len(devices)} devices")
        if {p.dtype for p in self._parameters.values()} - {torch.float32, torch.bfloat16, torch.float16}:
            raise Unsupported("weights are not float32, bfloat16 or float16")
        self.quantization = None

    def has(self, name: str) -> bool:
        return name in self._parameters

    def quantized(self, name: str) -> bool:
        return False

    def read(self, name: str, rows: Ranges | None = None, columns: Ranges | None = None) -> torch.Tensor:
        return _slice(self._parameters[name].detach(), rows, columns)

    def adopt(self, parts: tuple[Part, ...], fused: torch.Tensor, axis: int) -> None:
        """Where `parts` are whole weights, point each at its view of `fused` (they were joined
        along `axis` into it); else leave them (Llama's q, k, v interleave: no views)."""
        parameters = [self._parameters[p.name] for p in parts]
        if not all(_covers(p, parameter.shape) for p, parameter in zip(parts, parameters, strict=True)):
            return
        start = 0
        for parameter in parameters:
            size = parameter.shape[axis]
            parameter.data = fused.narrow(axis, start, size)
            start += size


class CheckpointSource:
    """A model folder's safetensors (checkpoint.py) onto `device`: floating tensors in `dtype`, a
    GPTQ, AWQ or saved int4 linear layer converted to int4 without loss."""

    def __init__(self, folder, *, device, dtype):
        from transformers import AutoConfig

        from chat.engine.checkpoint import Checkpoint
        from chat.engine.int4 import checkpoints as checkpoint_quantization

        self.folder, self.device, self.dtype = folder, torch.device(device), dtype
        self.config = AutoConfig.from_pretrained(folder, trust_remote_code=False)  # refuse, never ask
        family_of(self.config)  # a model the decoder cannot run is refused before any reading
        self.checkpoint = Checkpoint(folder)
        self.quantization = checkpoint_quantization.read(folder)
        self._used: set[str] = set()
        self._converted: dict[tuple[str, int], object] = {}  # the last few layers converted whole

    def has(self, name: str) -> bool:
        return name in self.checkpoint or self.quantized(name)

    def quantized(self, name: str) -> bool:
        module = name.removesuffix(".weight")
        return self.quantization is not None and f"{module}.{self.quantization.parts[0]}" in self.checkpoint

    def read(self, name: str, rows: Ranges | None = None, columns: Ranges | None = None) -> torch.Tensor:
        self._used.add(name)
        return self.checkpoint.read(name, rows, columns, device=self.device, dtype=self.dtype)

    def read_int4(self, name: str, rows: Ranges | None, columns: Ranges | None, group: int):
        """A quantized layer's rows or columns as an `Int4Weight` in groups of `group` columns."""
        from chat.engine.int4 import weight as int4

        module = name.removesuffix(".weight")
        key = (module, group)
        if key not in self._converted:
            parts = {}
            for part in self.quantization.parts:
                if f"{module}.{part}" in self.checkpoint:
                    self._used.add(f"{module}.{part}")
                    parts[part] = self.checkpoint.read(f"{module}.{part}", device=self.device)
            self._converted[key] = self.quantization.to_int4(parts, group, module)
            while len(self._converted) > 8:  # Llama's q, k and v are read a KV head at a time
                self._converted.pop(next(iter(self._converted)))
        return int4.take(self._converted[key], rows, columns)

    def check_all_used(self, tied: bool) -> None:
        """Every tensor of the checkpoint was laid out, or is one known to change nothing (rotary
        tables, a tied head's copy, a quantizer's scales checked to be 1): a tensor left out
        silently would be a wrong model."""
        left = []
        for name in sorted(self.checkpoint.names() - self._used):
            if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                continue
            if self.quantization is not None and self.quantization.drops(name, self.checkpoint.read(name)):
                continue
            left.append(name)
        if left:
            raise Unsupported(
                f"the checkpoint holds tensors the fast decoder does not read: {', '.join(left[:4])}"
            )


@dataclass(frozen=True)
class CheckpointWeights:
    """A model folder, as a picklable description (tensor-parallel ranks open it themselves)."""

    folder: str

    def open(self, device, dtype) -> CheckpointSource:
        return CheckpointSource(self.folder, device=device, dtype=dtype)


def _slice(tensor: torch.Tensor, rows: Ranges | None, columns: Ranges | None) -> torch.Tensor:
    if rows is not None:
        return _join([tensor[r.start : r.stop] for r in rows], 0)
    if columns is not None:
        return _join([tensor[:, c.start : c.stop] for c in columns], 1)
    return tensor


def _covers(part: Part, shape) -> bool:
    """True if `part` takes every row and column of a weight of `shape`."""
    rows = part.rows is None or part.rows == [range(0, shape[0])]
    return rows and (part.columns is None or part.columns == [range(0, shape[1])])


def _join(parts, axis):
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=axis)


# -- the layout ------------------------------------------------------------------------------------


def lay_out(
    source,
    *,
    max_len: int,
    products: type[Products] = Dense,
    rank: int = 0,
    world: int = 1,
    quantize: str | None = None,
    save=None,
) -> Layout:
    """Rank `rank` of `world`'s share of the model in `source`, laid out for `FastDecoder`.

    `quantize` ("hqq", "clip" or "none": int4/weight.py's scale searches): every product in int4,
    `products` an int4 adapter (int4/products.py). `save` (int4/saved.py's `Int4Writer`, one
    device only) receives each int4 weight and dense tensor as it is made.
    """
    config = source.config
    family = family_of(config)
    shape = family.shape(config)
    plan = RankPlan.make(shape, rank, world)
    ffn = share(shape.ffn, world, rank)
    packer = _Packer(source, products, shape, rank, quantize, save)
    with torch.no_grad():
        layers = []
        for i in range(shape.layers):
            recipe = family.layer(i, shape, plan, [ffn])
            ln_attn = packer.norm(recipe.ln_attn, shape.eps)
            norm_weight = ln_attn[0]  # in the decoder's dtype, on its device: the cache's too
            cache = torch.zeros(
                len(plan.kv_heads),
                max_len,
                shape.head_dim,
                dtype=norm_weight.dtype,
                device=norm_weight.device,
            )
            layers.append(
                Layer(
                    ln_attn=ln_attn,
                    ln_mlp=packer.norm(recipe.ln_mlp, shape.eps) if recipe.ln_mlp else None,
                    w_in=packer.pack(recipe.w_in),
                    w_mlp_in=packer.pack(recipe.w_mlp_in) if recipe.w_mlp_in else None,
                    w_out=packer.pack(recipe.w_out),
                    w_mlp_out=packer.pack(recipe.w_mlp_out) if recipe.w_mlp_out else None,
                    k_cache=cache,
                    v_cache=cache.clone(),
                )
            )
            packer.flush()
        embed = packer.read(family.embed)
        head = "lm_head.weight" if source.has("lm_head.weight") else family.embed  # else tied
        lm_head = packer.pack(
            Product((Part(head, rows=[plan.vocab_rows]),)),
            pad_rows_to=plan.vocab_per_rank,
            save_as="lm_head.weight",
        )
        cos, sin = rotary_tables(family.rotary(config), max_len, embed.device, embed.dtype)
        ln_f = packer.norm(family.final_norm, shape.eps)
        packer.flush()
    if isinstance(source, CheckpointSource):
        source.check_all_used(tied=head != "lm_head.weight")
    return Layout(
        embed=embed,
        ln_f=ln_f,
        lm_head=lm_head,
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
        parallel=shape.parallel,
        norm=family.norm,
        act=family.act,
        family=family.name,
    )


class _Packer:
    """Reads each product's parts, joins them and packs them (see the module docstring)."""

    def __init__(self, source, products, shape: Shape, rank: int, quantize: str | None, save):
        self.source, self.products, self.shape, self.rank = source, products, shape, rank
        self.quantize, self.save = quantize, save
        self._pieces: dict[str, list] = {}  # what `save` gets at the next flush, by name

    def read(self, name: str, rows: Ranges | None = None, columns: Ranges | None = None) -> torch.Tensor:
        tensor = self.source.read(name, rows, columns)
        if self.save is not None:
            self._pieces.setdefault(name, []).append(tensor)
        return tensor

    def norm(self, prefix: str, eps: float) -> tuple:
        bias = self.read(prefix + ".bias") if self.source.has(prefix + ".bias") else None
        return (self.read(prefix + ".weight"), bias, float(eps))

    def pack(self, product: Product, pad_rows_to: int | None = None, save_as: str | None = None) -> tuple:
        """The product's parts read, joined and packed; with `pad_rows_to`, zero rows added (the
        last rank's share of the vocabulary); saved under `save_as` (the head, when tied)."""
        bias = self._bias(product)
        int4_parts = any(self.source.quantized(p.name) for p in product.parts)
        if self.quantize is None and not int4_parts:
            weights = [self.read(p.name, p.rows, p.columns) for p in product.parts]
            fused = _join(weights, product.axis)
            if pad_rows_to is not None and fused.shape[0] < pad_rows_to:
                fused = torch.cat([fused, fused.new_zeros(pad_rows_to - fused.shape[0], fused.shape[1])])
            if hasattr(self.source, "adopt") and len(weights) > 1:
                self.source.adopt(product.parts, fused, product.axis)
            return self.products.pack(fused, bias)
        if not hasattr(self.products, "from_int4"):
            method = getattr(self.source.quantization, "method", "4-bit")
            raise Unsupported(f"the checkpoint is quantized ({method}): run it with --quantize int4")
        from chat.engine.int4 import weight as int4

        group = self._group(product)
        pieces = [self._int4(p, group, save_as) for p in product.parts]
        fused = int4.concat(pieces, product.axis)
        if pad_rows_to is not None and fused.shape[0] < pad_rows_to:
            fused = int4.pad_rows(fused, pad_rows_to)
        return self.products.from_int4(fused, bias)

    def flush(self) -> None:
        """Hand `save` what was made since the last flush, each weight whole again (a layer's
        q, k and v are read a KV head at a time)."""
        if self.save is None:
            return
        from chat.engine.int4 import weight as int4

        for name, pieces in self._pieces.items():
            if isinstance(pieces[0], torch.Tensor):
                self.save.add_dense(name, _join(pieces, 0))
            else:
                self.save.add_int4(name.removesuffix(".weight"), int4.concat(pieces, 0))
        self._pieces.clear()

    def _int4(self, part: Part, group: int, save_as: str | None = None):
        from chat.engine.int4 import weight as int4

        if self.source.quantized(part.name):
            weight = self.source.read_int4(part.name, part.rows, part.columns, group)
        else:
            weight = int4.quantize(
                self.source.read(part.name, part.rows, part.columns), group, search=self.quantize
            )
        if self.save is not None:
            self._pieces.setdefault(save_as or part.name, []).append(weight)
        return weight

    def _group(self, product: Product) -> int:
        """The largest kernel group dividing every joined part's columns (and the checkpoint's
        groups): a group must not straddle the seam between two parts."""
        from chat.engine.int4 import weight as int4

        if product.axis == 0:  # outputs stacked: every part reads the hidden state
            widths = [self.shape.hidden]
        else:
            widths = [sum(len(c) for c in p.columns) for p in product.parts]
        size = math.gcd(*widths)
        quantization = self.source.quantization
        for part in product.parts:  # a 4-bit checkpoint's groups: ours may split them, not join them
            if quantization is not None and self.source.quantized(part.name):
                group = quantization.group_of(part.name.removesuffix(".weight"))
                size = size if group == -1 else math.gcd(size, group)
        return int4.group_size_for(size)

    def _bias(self, product: Product):
        names = [p.bias for p in product.parts if p.bias is not None and self.source.has(p.bias)]
        if not names:
            return None
        if len(names) != len(product.parts):
            raise Unsupported(f"{names[0]} has a bias where the weights joined with it have none")
        if product.axis == 0:
            return _join([self.read(p.bias, p.rows) for p in product.parts], 0)
        # Side by side, the products add up into one output: their biases too, added by one rank.
        biases = [self.read(p.bias) for p in product.parts]
        return sum(biases[1:], biases[0]) if self.rank == 0 else None
