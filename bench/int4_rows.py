"""The cost of a speculative verify step's products: 1 to 8 rows through int4 and bf16 kernels.

    PYTHONUNBUFFERED=1 python bench/int4_rows.py --shapes 180b falcon3-10b --out bench/results/x.json

For each product a layer of the shape runs (and the LM head), with random weights: bf16 cuBLAS
(`F.linear`), torch's tinygemm (`_weight_int4pack_mm`), our GEMV (gemv.py: one program per row,
its config tuned at one row), and our rows product (rows.py: each weight tile read once for all
rows) at its best config of the sweep and at the one `rows.tune` picks. Each is checked against
the float32 product of its dequantized weight first, then timed replaying a CUDA graph over enough
copies of the weight that the L2 holds none. The table gives µs per layer (all its products) and
the ratio to the same kernel's one row: issue #28's goal is <= 1.15 for 2-8 rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.int4_kernels import SHAPES, copy_bandwidth, lm_head, products, say

ROWS = (1, 2, 3, 4, 5, 6, 8)
TUNED_ROWS = (2, 5, 8)  # where `rows.tune`'s pick is checked against the sweep's best
# Falcon3-10B (the Llama layout, tiiuae/Falcon3-10B-Base's config): hidden 3072, 12 query and 4
# KV heads of 256, MLP 23040, vocabulary 131072; products as a fused layout runs them.
LLAMA_SHAPES = {
    "falcon3-10b": dict(hidden=3072, heads=12, kv_heads=4, head_dim=256, ffn=23040, vocab=131072),
    "tiny": dict(hidden=256, heads=4, kv_heads=2, head_dim=64, ffn=384, vocab=512),  # the CPU smoke run
}


def shape_products(shape: str) -> dict[str, tuple[int, int]]:
    """[out, in] of each product of a layer, and the LM head."""
    if shape in LLAMA_SHAPES:
        s = LLAMA_SHAPES[shape]
        qkv = (s["heads"] + 2 * s["kv_heads"]) * s["head_dim"]
        return {
            "qkv": (qkv, s["hidden"]),
            "o": (s["hidden"], s["heads"] * s["head_dim"]),
            "gate+up": (2 * s["ffn"], s["hidden"]),
            "down": (s["hidden"], s["ffn"]),
            "lm_head": (s["vocab"], s["hidden"]),
        }
    return {**products(shape), "lm_head": lm_head(shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes", nargs="+", default=["180b", "falcon3-10b"], choices=[*SHAPES, *LLAMA_SHAPES]
    )
    parser.add_argument("--rows", nargs="+", type=int, default=list(ROWS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch

    from chat.engine.int4 import rows as int4_rows

    if not torch.cuda.is_available():  # a smoke run of this script: Triton's interpreter, tiny shapes
        args.shapes, args.rows = ["tiny"], [1, 3]
    cuda = torch.cuda.is_available()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size if cuda else 0  # the smoke run: no copies
    results = {
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if cuda else "cpu (smoke run)",
        "torch": torch.__version__,
        "copy_TBps": copy_bandwidth() / 1e12 if cuda else 0.0,
        "rows_candidates": [str(c) for c in int4_rows.CANDIDATES],
        "products": [],
    }
    say(f"{results['device']}, copy {results['copy_TBps']:.2f} TB/s, L2 {l2 >> 20} MB")
    for shape in args.shapes:
        for part, (n, k) in shape_products(shape).items():
            row = measure(shape, part, n, k, args.rows, l2)
            results["products"].append(row)
            say(
                f"{shape} {part:8} [{n}x{k}] "
                + "; ".join(
                    f"{kernel}: " + " ".join(f"{r}:{t['us']:.0f}" for r, t in by_rows.items() if "us" in t)
                    for kernel, by_rows in row["kernels"].items()
                )
            )
            if args.out:  # after each product: a run cut short keeps what it measured
                write(args.out, results)
            torch.cuda.empty_cache()
    print_table(results, args.rows)
    if args.out:
        write(args.out, results)


def measure(shape, part, n, k, row_counts, l2) -> dict:
    import torch
    import torch.nn.functional as F

    from chat.engine.int4 import gemv as int4_gemv
    from chat.engine.int4 import rows as int4_rows
    from chat.engine.int4 import weight as int4
    from chat.engine.int4.products import Int4TinyGemm

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    q = int4.random_int4(n, k, device=device, dtype=dtype)
    nbytes = q.nbytes
    dense = int4.dequantize(q, dtype)
    kernels = {"bf16 cuBLAS": (lambda x, w: F.linear(x, w), (dense,), n * k * 2)}
    if cuda:
        kernels["tinygemm"] = (
            lambda x, *t: Int4TinyGemm.linear(x, *t),
            Int4TinyGemm.from_int4(q, None),
            nbytes,
        )
    packed = int4_gemv.pack(q)
    one_row = torch.randn(1, k, device=device, dtype=dtype)
    if cuda:
        int4_gemv.tune(one_row, *packed)
    config = int4_gemv.chosen(one_row, packed[0])  # the GEMV at several rows keeps its one-row config
    kernels["our GEMV (per row)"] = (lambda x, *p: int4_gemv.gemv(x, *p, config), packed, nbytes)
    row = {"shape": shape, "part": part, "n": n, "k": k, "int4_bytes": nbytes, "kernels": {}}
    checked = {}
    for label, (call, weights, size) in kernels.items():
        row["kernels"][label] = timings(call, weights, size, row_counts, l2, dense, checked, label)
    # Ours over several rows: every candidate at every row count; the best, and what tune picks.
    sweep = {}
    for config in int4_rows.CANDIDATES:
        sweep[str(config)] = timings(
            lambda x, *p, c=config: int4_rows.gemm_rows(x, *p, c),
            packed,
            nbytes,
            row_counts,
            l2,
            dense,
            checked,
            str(config),
        )
    best, tuned = {}, {}
    for count in row_counts:
        ok = {c: t[count]["us"] for c, t in sweep.items() if "us" in t.get(count, {})}
        if ok:
            name = min(ok, key=ok.get)
            best[count] = {**sweep[name][count], "config": name}
        if cuda and count in TUNED_ROWS:
            x = torch.randn(count, k, device=device, dtype=dtype)
            int4_rows.tune(x, *packed)
            picked = str(int4_rows.chosen(x, packed[0]))
            tuned[count] = {**sweep.get(picked, {}).get(count, {}), "config": picked}
    row["kernels"]["our rows product, best"] = best
    row["kernels"]["our rows product, tuned"] = tuned
    row["rows_sweep"] = sweep
    row["errors"] = checked
    return row


def timings(call, weights, nbytes, row_counts, l2, dense, checked, label) -> dict:
    """{rows: {"us", "TBps"}} for `call(x, *weights)`, or {rows: {"error"}}; checked first."""
    import torch

    copies = [weights] + [tuple(t.clone() for t in weights) for _ in range(max(1, -(-4 * l2 // nbytes)) - 1)]
    out = {}
    for count in row_counts:
        x = torch.randn(count, dense.shape[1], device=dense.device, dtype=dense.dtype)
        try:
            exact = x.float() @ dense[:4096].float().T
            got = call(x, *weights)[:, : exact.shape[1]].float()
            error = ((got - exact).norm() / exact.norm()).item()
            checked[f"{label} x{count}"] = error
            if not error < 1e-2:
                out[count] = {"error": f"relative error {error:.3g}"}
                continue
            us = time_us(lambda: [call(x, *w) for w in copies]) / len(copies)
            out[count] = {"us": us, "TBps": nbytes / (us * 1e-6) / 1e12}
        except Exception as failure:  # a configuration this GPU cannot compile or run
            out[count] = {"error": f"{type(failure).__name__}: {str(failure)[:200]}"}
    return out


def time_us(function) -> float:
    """Microseconds per call: replayed from a CUDA graph (bench/int4_kernels.py's), or on the CPU
    (the smoke run) one call's wall time."""
    import time

    import torch

    if torch.cuda.is_available():
        from bench.gpu_decode import graph_ms

        return graph_ms(function, replays=20, warm_ups=2, repeats=3) * 1e3
    function()
    start = time.perf_counter()
    function()
    return (time.perf_counter() - start) * 1e6


def print_table(results: dict, row_counts) -> None:
    say(f"\n{results['device']}: µs per layer (all its products) by rows; (x) = over the same kernel's 1 row")
    kernels = list(results["products"][0]["kernels"])
    say("| shape | kernel | " + " | ".join(f"{r} rows" for r in row_counts) + " |")
    say("| --- | --- |" + " ---: |" * len(row_counts))
    for shape in dict.fromkeys(p["shape"] for p in results["products"]):
        parts = [p for p in results["products"] if p["shape"] == shape]
        for where, chosen in (
            ("layer", [p for p in parts if p["part"] != "lm_head"]),
            ("LM head", [p for p in parts if p["part"] == "lm_head"]),
        ):
            for kernel in kernels:
                totals = {}
                for count in row_counts:
                    times = [p["kernels"][kernel].get(count, {}).get("us") for p in chosen]
                    totals[count] = sum(times) if all(t is not None for t in times) else None
                one = totals.get(1)
                cells = [
                    "-" if t is None else f"{t:.0f}" + (f" ({t / one:.2f}x)" if one else "")
                    for t in totals.values()
                ]
                say(f"| {shape} {where} | {kernel} | " + " | ".join(cells) + " |")


def write(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
