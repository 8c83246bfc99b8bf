"""int4 weight-only kernels side by side: one Falcon layer's products at batch 1, in a CUDA graph.

    PYTHONUNBUFFERED=1 python bench/int4_kernels.py --shapes 180b 40b 7b --out bench/results/x.json

For each shape, the products the fast decoder runs per layer (fused QKV [+ MLP in], MLP in where
the MLP has its own norm, the fused out-projection) and the LM head, through: bf16 cuBLAS
(F.linear), torch's built-in tinygemm (`_weight_int4pack_mm`), torchao's int4 weight-only
tensor (tile-packed, the same kernel behind a tensor subclass), GemLite, and our Triton GEMV.
Each is checked against the float32 product of its dequantized weight before it is timed
(torchao, which quantizes by itself, against the bf16 product: within int4's own error). Bytes read: weights (+ scales and offsets) only; TB/s = bytes / time.
Layers are repeated until the weights read per replay exceed 4x the L2, so nothing is cached.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import gpu_decode

# Kernels autotune and compile on their first calls: three calls off the capture, median of five.
graph_ms = functools.partial(gpu_decode.graph_ms, replays=30, warm_ups=3, repeats=5)

# hidden, heads, kv heads (0: multi-query with one), two norms
SHAPES = {
    "7b": (4544, 71, 1, False),
    "40b": (8192, 128, 8, True),
    "180b": (14848, 232, 8, True),
}
VOCAB = 65024


TP_SHAPES = ("180b-tp2", "40b-tp2")  # one rank's slices under tensor parallelism


def products(shape: str) -> dict[str, tuple[int, int]]:
    """[out, in] of each product of a layer; for "<shape>-tpN", one rank's: the input products
    split by outputs, the out-projection by inputs (chat/engine/parallel/ranks.py)."""
    name, _, ranks = shape.partition("-tp")
    ranks = int(ranks or 1)
    hidden, heads, kv, two_norms = SHAPES[name]
    head_dim = hidden // heads
    qkv = (heads + 2 * kv) * head_dim // ranks
    ffn = 4 * hidden // ranks
    out = (hidden, (hidden + 4 * hidden) // ranks)
    if two_norms:
        return {"qkv": (qkv, hidden), "mlp_in": (ffn, hidden), "out": out}
    return {"qkv+mlp_in": (qkv + ffn, hidden), "out": out}


def lm_head(shape: str) -> tuple[int, int]:
    """[out, in] of the LM head (one rank's vocabulary slice under tensor parallelism)."""
    name, _, ranks = shape.partition("-tp")
    return VOCAB // int(ranks or 1), SHAPES[name][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["7b", "40b", "180b"], choices=SHAPES)
    parser.add_argument("--kernels", nargs="+", default=["bf16", "tinygemm", "torchao", "gemlite", "triton"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch

    from chat.engine.int4 import weight as int4

    results = {
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }
    results["copy_TBps"] = copy_bandwidth() / 1e12
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    say(
        f"{results['device']}, torch {torch.__version__}, copy {results['copy_TBps']:.2f} TB/s, L2 {l2 >> 20} MB"
    )
    rows = results["rows"] = []
    for shape in args.shapes:
        torch.manual_seed(0)
        sizes = list(products(shape).values())
        layer_bf16 = sum(n * k * 2 for n, k in sizes)
        copies = max(1, -(-4 * l2 * 4 // layer_bf16))  # int4 reads a quarter of bf16's bytes
        weights = [
            [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for n, k in sizes]
            for _ in range(copies)
        ]
        start = time.perf_counter()
        quantized = [[int4.quantize(w, search="clip") for w in layer] for layer in weights]
        torch.cuda.synchronize()
        quantize_s = time.perf_counter() - start
        say(
            f"\n{shape}: products {sizes} x {copies} layer copies; clip-search quantize "
            f"{layer_bf16 * copies / 1e9 / quantize_s:.1f} GB of bf16 per s"
        )
        head = [torch.randn(VOCAB, SHAPES[shape][0], device="cuda", dtype=torch.bfloat16) * 0.02]
        head_q = [int4.quantize(head[0], search="none")]
        x_by_k = {
            k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            for _, k in sizes + [(0, SHAPES[shape][0])]
        }
        for kernel in args.kernels:
            for part, (ws, qs) in {"layer": (weights, quantized), "lm_head": ([head], [head_q])}.items():
                try:
                    r = bench_kernel(kernel, ws, qs, x_by_k)
                except Exception as error:  # a kernel that cannot run here is a row that says why
                    r = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
                r.update(shape=shape, kernel=kernel, part=part)
                rows.append(r)
                if "error" in r:
                    say(f"  {shape} {part:8} {kernel:9} FAILED {r['error']}")
                else:
                    say(
                        f"  {shape} {part:8} {kernel:9} {r['us_per_layer']:8.1f} us  {r['TBps']:.2f} TB/s  "
                        f"rel.err {r['max_rel_error']:.2e}"
                    )
        del weights, quantized, head, head_q
        torch.cuda.empty_cache()
    print_table(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


def bench_kernel(kernel, weights, quantized, x_by_k) -> dict:
    import torch
    import torch.nn.functional as F

    from bench.int4_adapters import make_linear
    from chat.engine.int4 import weight as int4

    if kernel == "bf16":
        calls = [[(lambda x, w=w: F.linear(x, w)) for w in layer] for layer in weights]
        nbytes = sum(w.numel() * 2 for layer in weights for w in layer)
    elif kernel == "torchao":
        calls = [
            [_torchao(w, q.group_size) for w, q in zip(*pair, strict=True)]
            for pair in zip(weights, quantized, strict=True)
        ]
        nbytes = sum(q.nbytes for layer in quantized for q in layer)
    else:
        calls = [[make_linear(q, kernel) for q in layer] for layer in quantized]
        nbytes = sum(q.nbytes for layer in quantized for q in layer)
    # Correctness: every product of the first layer against the float32 dequantized product.
    worst = 0.0
    for call, w, q in zip(calls[0], weights[0], quantized[0], strict=True):
        x = torch.randn_like(x_by_k[w.shape[1]])
        if kernel == "bf16" or kernel == "torchao":
            reference = w.float()
        else:
            reference = int4.dequantize(q)
        exact = x.float() @ reference.T
        out = call(x)
        worst = max(worst, ((out.float() - exact).norm() / exact.norm()).item())
    limit = 0.2 if kernel == "torchao" else 2e-2
    if not worst == worst or worst > limit:
        raise AssertionError(f"relative error {worst:.3g} against the float32 reference")

    def step():
        for layer in calls:
            for call, w in zip(layer, weights[0], strict=True):
                call(x_by_k[w.shape[1]])

    ms = graph_ms(step)
    return {
        "us_per_layer": ms * 1e3 / len(calls),
        "TBps": nbytes / (ms * 1e-3) / 1e12,
        "bytes_per_layer": nbytes / len(calls),
        "max_rel_error": worst,
    }


def _torchao(w, group_size: int):
    import torch
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="cuda", dtype=torch.bfloat16)
    linear.weight.data.copy_(w)
    quantize_(linear, Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d"))
    return linear


def copy_bandwidth() -> float:
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * src.numel() * 20 / (start.elapsed_time(end) * 1e-3)


def print_table(results: dict) -> None:
    say(
        f"\n{results['device']}, copy {results['copy_TBps']:.2f} TB/s; us per layer (TB/s read; x = speed-up over bf16)"
    )
    say("| shape | part | " + " | ".join(sorted({r["kernel"] for r in results["rows"]}, key=_order)) + " |")
    kernels = sorted({r["kernel"] for r in results["rows"]}, key=_order)
    say("| --- | --- |" + " ---: |" * len(kernels))
    keys = []
    for r in results["rows"]:
        if (r["shape"], r["part"]) not in keys:
            keys.append((r["shape"], r["part"]))
    for shape, part in keys:
        by_kernel = {r["kernel"]: r for r in results["rows"] if r["shape"] == shape and r["part"] == part}
        base = by_kernel.get("bf16", {}).get("us_per_layer")
        cells = []
        for kernel in kernels:
            r = by_kernel.get(kernel, {})
            if "us_per_layer" not in r:
                cells.append("failed" if r else "")
                continue
            speedup = f", {base / r['us_per_layer']:.2f}x" if base else ""
            cells.append(f"{r['us_per_layer']:.0f} ({r['TBps']:.2f}{speedup})")
        say(f"| {shape} | {part} | " + " | ".join(cells) + " |")


def _order(kernel: str) -> int:
    order = ["bf16", "tinygemm", "torchao", "gemlite", "triton"]
    return order.index(kernel) if kernel in order else len(order)


def say(text: str) -> None:
    print(text, flush=True)


if __name__ == "__main__":
    main()
