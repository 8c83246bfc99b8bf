"""One rank's load under tensor parallelism with int4 slices: its peak memory against what it keeps,
and the time per parameter of each way of making the slices.

    python bench/rank_load.py                    # the CPU: a scaled-down 180B-like shape, 2 and 8 layers
    python bench/rank_load.py --layers 2 4       # on a GPU: the same, in bf16

A rank reads each product's slice (bench/random_weights.py's `RandomSource` draws the whole tensor and keeps the slice) and
packs it at once (chat/engine/weights.py), so its peak should be what it keeps plus about one layer's tensors
in flight, the same whatever the number of layers; a loader that held its bf16 share first would
grow by that share (printed beside). Each load runs in a fresh process. Memory: the GPU's
allocator statistics, or on the CPU the process's resident high-water mark (/proc/self/status
VmHWM) above what it held before loading, with glibc returning every freed block over 128 kB at
once (MALLOC_MMAP_THRESHOLD_), so the mark follows the live tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_decode import model_bytes, say

# Falcon-180B's proportions (new decoder architecture, 8 KV heads, MLP 4x), narrower.
SHAPE = dict(
    hidden_size=2048,
    num_attention_heads=32,
    num_kv_heads=8,
    new_decoder_architecture=True,
    vocab_size=8192,
    parallel_attn=True,
    bias=False,
    alibi=False,
    max_position_embeddings=2048,
)
PARAMS_180B_RANK = 89.3e9  # one rank's products of Falcon-180B under TP=2 (80 layers + half the head)


class Memory:
    """Bytes in use now and at most since `reset`, on `device`."""

    def __init__(self, device):
        import torch

        self.torch, self.device = torch, torch.device(device)

    def reset(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def now(self) -> int:
        if self.device.type == "cuda":
            return self.torch.cuda.memory_allocated()
        return _status("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return self.torch.cuda.max_memory_allocated()
        return _status("VmHWM")


def _status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def load_rank(layers: int, int4: str, device, dtype, memory: Memory) -> dict:
    """Rank 0 of 2's slice of a `layers`-layer model: seconds, held and peak memory (GB)."""
    import gc

    import torch
    from transformers import FalconConfig

    from bench.random_weights import RandomWeights
    from chat.engine.parallel.ranks import RankSpec, rank_layout

    config = FalconConfig(**SHAPE, num_hidden_layers=layers)
    spec = RankSpec(
        world=2,
        port=0,
        max_len=256,
        eos_token_id=None,
        weights=RandomWeights(config.to_dict(), int4=int4 == "random"),
        products="int4",
    )
    torch.zeros(1, device=device)  # the GPU's context, before the count starts
    gc.collect()
    base = memory.now()
    memory.reset()
    start = time.perf_counter()
    layout = rank_layout(spec, 0, device, dtype)
    seconds = time.perf_counter() - start
    held, peak = memory.now() - base, memory.peak() - base
    share = model_bytes(config) / 2  # the rank's half in bf16
    del layout
    return {
        "layers": layers,
        "int4": int4,
        "s": round(seconds, 2),
        "held_GB": held / 1e9,
        "peak_GB": peak / 1e9,
        "peak_minus_held_GB": (peak - held) / 1e9,
        "share_bf16_GB": share / 1e9,
    }


def quantize_cost(device, dtype) -> dict:
    """ns per parameter of int4.quantize with each search, and of drawing int4 directly, on one
    [8192, 2048] weight (the scaled shape's MLP product)."""
    import torch

    from chat.engine.int4.weight import quantize, random_int4

    weight = torch.randn(8192, 2048, device=device, dtype=dtype) * 0.02
    costs = {}
    for search in ("none", "clip", "hqq", "random"):
        make = (
            (lambda: random_int4(8192, 2048, device=device, dtype=dtype))
            if search == "random"
            else (lambda: quantize(weight, search=search))
        )
        make()  # warm
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        make()
        if device.type == "cuda":
            torch.cuda.synchronize()
        costs[search] = (time.perf_counter() - start) / weight.numel() * 1e9
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--int4", nargs="+", default=["hqq", "random"], choices=["hqq", "random"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", nargs=2, metavar=("LAYERS", "INT4"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.one:  # a child: one load, its JSON on the last line
        print(json.dumps(load_rank(int(args.one[0]), args.one[1], device, torch.bfloat16, Memory(device))))
        return
    results = {
        "command": " ".join(sys.argv),
        "device": str(device),
        "torch": torch.__version__,
        "shape": SHAPE,
        "loads": [],
    }
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    for int4 in args.int4:
        for layers in args.layers:
            child = subprocess.run(
                [sys.executable, __file__, "--one", str(layers), int4],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            results["loads"].append(load := json.loads(child.stdout.strip().splitlines()[-1]))
            say(json.dumps(load))
    costs = quantize_cost(device, torch.bfloat16)
    results["ns_per_parameter"] = costs
    results["180b_rank_estimate_s_at_this_speed"] = {k: v * PARAMS_180B_RANK / 1e9 for k, v in costs.items()}
    say(f"ns per parameter: {costs}")
    say(
        "| int4 slices | layers | load (s) | held (GB) | peak (GB) | peak - held (GB) | its share in bf16 (GB) |"
    )
    say("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results["loads"]:
        say(
            f"| {r['int4']} | {r['layers']} | {r['s']:.1f} | {r['held_GB']:.3f} | {r['peak_GB']:.3f} | "
            f"{r['peak_minus_held_GB']:.3f} | {r['share_bf16_GB']:.3f} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
