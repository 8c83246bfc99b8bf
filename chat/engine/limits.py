"""What a model folder may make us allocate: its config checked before anything is built.

A config.json is input like any other. Its sizes drive allocations: `num_hidden_layers: 100000`
had transformers build layers for 75 s up to a MemoryError, `max_position_embeddings: 9999999`
sized the fast decoder's static cache (5.2 GB for the tiny model), and each bad folder ended in a
traceback (issue #24). Before loading, `check_model` refuses, in one sentence:

- sizes that are not whole numbers in a range any model we load has (`BOUNDS`);
- a config that describes far more weights than the folder's weight files hold (every format we
  read stores at least 4 bits a weight);
- weights and static cache that together do not fit the memory free on the device they go to.

The context a config claims sizes the cache only up to `MAX_CONFIG_CONTEXT` tokens (the longest
of the Falcon and Llama 3 families); `--max-total-tokens` may ask for more, checked the same way.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from chat.conversation.errors import ConfigError

MAX_CONFIG_CONTEXT = 131_072
# The largest of each size in any model we serve, with room: a config past them is not a model.
BOUNDS = {
    "num_hidden_layers": 1_024,
    "hidden_size": 1 << 17,
    "num_attention_heads": 1 << 12,
    "vocab_size": 1 << 22,
    "intermediate_size": 1 << 20,
    "ffn_hidden_size": 1 << 20,
    "num_key_value_heads": 1 << 12,
    "num_kv_heads": 1 << 12,
    "head_dim": 1 << 12,
    "max_position_embeddings": 1 << 24,
}
MAX_CONFIG_BYTES = 1 << 20
WEIGHT_FILES = ("*.safetensors", "*.bin")
MIN_BITS_PER_WEIGHT = 4  # GPTQ, AWQ and our int4; dense checkpoints store 16 or 32
SLACK_BYTES = 16 << 20  # a small model's headers, norms and biases
FREE_SHARE = 0.95  # of the free memory, what the weights and cache may take


@dataclass(frozen=True)
class Sizes:
    """A config's sizes as the engine counts them."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int

    @property
    def linear_weights(self) -> int:
        """Weights of the layers' products (a lower bound: a gated MLP has a third matrix)."""
        attention = (
            2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim
        )
        return self.layers * (attention + 2 * self.hidden * self.ffn)

    @property
    def weights(self) -> int:
        return self.linear_weights + self.vocab * self.hidden  # the embedding (a tied head once)

    def cache_bytes(self, context: int, element_bytes: int) -> int:
        """The fast decoder's static cache (keys and values) and its per-position tables."""
        per_position = 2 * self.layers * self.kv_heads * self.head_dim * element_bytes
        per_position += 2 * self.head_dim * element_bytes + 16  # rotary cos and sin; token ids
        return context * per_position


def check_config_file(folder) -> None:
    """config.json's sizes as written, before transformers reads them (its own checks end in
    tracebacks of several lines)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return  # the loader says so
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is {path.stat().st_size:,} bytes long; a model's config is a few kB")
    try:
        values = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is not JSON ({str(error)[:100]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    check_bounds(values.get, str(path))


def check_bounds(get, where: str) -> None:
    """Each size `get(field)` gives is a whole number within `BOUNDS` (or absent)."""
    for field, bound in BOUNDS.items():
        value = get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= bound:
            raise ConfigError(
                f"{where}: {field} is {json.dumps(value, default=str)[:40]}; it must be a whole number "
                f"from 1 to {bound:,}"
            )


def sizes(config, where: str = "config.json") -> Sizes:
    """The config's sizes, each a whole number within `BOUNDS`, or ConfigError naming the field."""
    check_bounds(lambda field: getattr(config, field, None), where)
    for field in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size"):
        if getattr(config, field, None) is None:
            raise ConfigError(f"{where} does not give {field}")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None)
    if getattr(config, "model_type", None) == "falcon":  # Falcon names its KV heads its own way
        kv_heads = (
            config.num_kv_heads if config.new_decoder_architecture else (1 if config.multi_query else heads)
        )
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "ffn_hidden_size", None)
    return Sizes(
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        heads=heads,
        kv_heads=kv_heads or heads,
        head_dim=max(head_dim, 1),
        ffn=ffn or 4 * config.hidden_size,
        vocab=config.vocab_size,
    )


def config_context(config) -> int | None:
    """The context the config claims, at most MAX_CONFIG_CONTEXT; None if it claims none."""
    length = getattr(config, "max_position_embeddings", None)
    if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
        return None
    return min(length, MAX_CONFIG_CONTEXT)


def check_weights_match(config_sizes: Sizes, folder: Path) -> int:
    """Refuse a config that describes more weights than the folder's weight files can hold;
    returns the bytes of those files (0: none, which the loader reports in its own words)."""
    stored = sum(path.stat().st_size for pattern in WEIGHT_FILES for path in Path(folder).glob(pattern))
    if not stored:
        return 0
    least = config_sizes.linear_weights * MIN_BITS_PER_WEIGHT // 8
    if least > stored * 1.25 + SLACK_BYTES:
        raise ConfigError(
            f"{Path(folder).name}/config.json describes {config_sizes.layers:,} layers of at least "
            f"{_gb(least)} of weights, but the folder's weight files hold {_gb(stored)}: the config "
            "does not belong to these weights"
        )
    return stored


def check_fits(
    config_sizes: Sizes,
    *,
    weight_bytes: float,
    context: int | None,
    element_bytes: int,
    free: int | None,
    where: str,
) -> None:
    """Refuse weights (`weight_bytes` a weight) and a `context`-token cache (None: no static
    cache) that need more than FREE_SHARE of `free` bytes (None: unknown, not checked)."""
    if free is None:
        return
    weights = math.ceil(config_sizes.weights * weight_bytes)
    cache = config_sizes.cache_bytes(context, element_bytes) if context else 0
    if weights + cache <= free * FREE_SHARE:
        return
    room = free * FREE_SHARE - weights
    fitting = int(room // config_sizes.cache_bytes(1, element_bytes)) if context and room > 0 else 0
    advice = (
        f"a --max-total-tokens of {fitting:,} fits"
        if fitting >= 256
        else "a smaller model, --quantize int4, or more memory is needed"
    )
    cache_words = f" and {_gb(cache)} for a {context:,}-token cache" if cache else ""
    raise ConfigError(
        f"the model needs about {_gb(weights + cache)} ({_gb(weights)} of weights{cache_words}) but "
        f"{where} has {_gb(free)} free: {advice}"
    )


def free_memory(cuda: bool, *, all_gpus: bool) -> int | None:
    """Bytes free where the model goes: the GPU (or all of them), else the machine's available
    memory (Linux's MemAvailable); None where it cannot be told."""
    if cuda:
        import torch

        devices = range(torch.cuda.device_count()) if all_gpus else [torch.cuda.current_device()]
        return sum(torch.cuda.mem_get_info(device)[0] for device in devices)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:,.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:,.1f} MB"
