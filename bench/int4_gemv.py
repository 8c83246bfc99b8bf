"""Our int4 GEMV's configurations swept on each Falcon product, beside bf16 cuBLAS and tinygemm.

    PYTHONUNBUFFERED=1 python bench/int4_gemv.py --shapes 180b 40b 7b --out bench/results/x.json

For every product the fast decoder runs per layer (bench/int4_kernels.py's `products`) and the LM
head, at batch 1: each (BLOCK_N, SPLIT, warps, stages) of the sweep is checked against the float32
product of the dequantized weight, then timed replaying a CUDA graph over enough copies of the
weight that the L2 holds none of it. TB/s = int4 weights + scales + offsets read / time; bf16 and
tinygemm (`_weight_int4pack_mm`) are timed the same way in the same run. It also says which config
`int4_gemv.tune` (the app's choice, from fewer candidates timed with do_bench) picks.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.int4_kernels import SHAPES, TP_SHAPES, copy_bandwidth, graph_ms, lm_head, products, say

SWEEP = dict(
    block_n=(32, 64, 128, 256), split=(1, 4, 8, 16), warps=(4, 8), stages=(1, 3), prefetch=(False, True)
)
FLOAT32 = (
    (256, 4, 4, 1, False, False),
    (128, 8, 4, 1, True, False),
    (128, 4, 4, 3, False, False),
)  # last run's best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["180b", "40b", "7b"], choices=[*SHAPES, *TP_SHAPES])
    parser.add_argument(
        "--sweep-shapes", nargs="*", default=["180b"], help="the others: tuning candidates only"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch

    from chat.engine.int4 import gemv as int4_gemv

    candidates = list(int4_gemv.CANDIDATES)
    swept = list(
        dict.fromkeys(candidates + [int4_gemv.Config(*c) for c in itertools.product(*SWEEP.values())])
    )
    bandwidth = copy_bandwidth()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    results = {
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "copy_TBps": bandwidth / 1e12,
        "rows": [],
    }
    say(f"{results['device']}, copy {bandwidth / 1e12:.2f} TB/s, {len(swept)} configs swept")
    for shape in args.shapes:
        configs = swept if shape in args.sweep_shapes else candidates
        parts = dict(products(shape), lm_head=lm_head(shape))
        for part, (n, k) in parts.items():
            row = measure_product(shape, part, n, k, configs, l2)
            results["rows"].append(row)
            if args.out:  # after each product: a run cut short keeps what it measured
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=1))
            ok = {c: r for c, r in row["sweep"].items() if "us" in r}
            top = sorted(ok, key=lambda c: ok[c]["us"])[:5]
            say(
                f"{shape} {part:10} [{n}x{k}] x{row['copies']}: bf16 {row['bf16']['us']:.1f} us ({row['bf16']['TBps']:.2f} TB/s), "
                f"tinygemm {row['tinygemm']['us']:.1f} ({row['tinygemm']['TBps']:.2f}), "
                + ", ".join(f"{c}: {ok[c]['us']:.1f} ({ok[c]['TBps']:.2f})" for c in top)
                + f"; tune picks {row['tuned']} ({row['tuned_us'] or float('nan'):.1f}); load only: "
                + ", ".join(f"{c}: {r['us']:.1f} ({r['TBps']:.2f})" for c, r in row["load_only"].items())
            )
            torch.cuda.empty_cache()
    print_table(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


def measure_product(shape, part, n, k, configs, l2) -> dict:
    """bf16, tinygemm and each config of ours on one [n, k] product, each over enough copies of
    its weight that the L2 holds none of them between replays."""
    import torch
    import torch.nn.functional as F

    from chat.engine.int4 import gemv as int4_gemv
    from chat.engine.int4 import weight as int4
    from chat.engine.int4.products import Int4TinyGemm

    torch.manual_seed(0)
    dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    q = int4.quantize(dense, search="none")
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    exact = x.float() @ int4.dequantize(q).T

    def copies_of(first, nbytes):
        return [first] + [
            tuple(t.clone() if t is not None else None for t in first)
            for _ in range(-(-4 * l2 // nbytes) - 1)
        ]

    def timed(call, copies, nbytes):
        us = graph_ms(lambda: [call(*c) for c in copies]) * 1e3 / len(copies)
        return {"us": us, "TBps": nbytes / (us * 1e-6) / 1e12}

    row = {"shape": shape, "part": part, "n": n, "k": k, "bytes": q.nbytes}
    row["bf16"] = timed(lambda w: F.linear(x, w), copies_of((dense,), n * k * 2), n * k * 2)
    row["tinygemm"] = timed(
        lambda *t: Int4TinyGemm.linear(x, *t), copies_of(Int4TinyGemm.from_int4(q, None), q.nbytes), q.nbytes
    )
    packed = copies_of(int4_gemv.pack(q), q.nbytes)
    row["copies"] = len(packed)
    sweep = row["sweep"] = {}
    for config in configs:
        try:
            error = ((int4_gemv.gemv(x, *packed[0], config).float() - exact).norm() / exact.norm()).item()
            if not error < 1e-2:
                sweep[str(config)] = {"error": f"relative error {error:.3g}"}
                continue
            sweep[str(config)] = timed(lambda *p, c=config: int4_gemv.gemv(x, *p, c), packed, q.nbytes)
        except Exception as failure:  # a config this GPU cannot compile or run
            sweep[str(config)] = {"error": f"{type(failure).__name__}: {str(failure)[:200]}"}
    ok = {c: r for c, r in sweep.items() if "us" in r}
    row["best"] = min(ok, key=lambda c: ok[c]["us"]) if ok else None
    # The layout's read rate: the three fastest configs' tiles again, only read and summed.
    from bench.int4_read_probe import read_tiles

    by_name = {str(c): c for c in configs}
    row["load_only"] = {
        name: timed(lambda *p, c=by_name[name]: read_tiles(x, *p, c), packed, q.nbytes)
        for name in sorted(ok, key=lambda c: ok[c]["us"])[:3]
    }
    tune_times = int4_gemv.tune(x, *packed[0])
    picked = str(int4_gemv.chosen(x, packed[0][0]))
    row.update(
        tuned=picked,
        tuned_us=ok.get(picked, {}).get("us"),
        tune_candidates_us={str(c): t for c, t in tune_times.items()},
    )
    return row


def print_table(results: dict) -> None:
    say(f"\n{results['device']}, copy {results['copy_TBps']:.2f} TB/s; us per product (TB/s read)")
    say("| shape | product | bf16 cuBLAS | tinygemm | ours, best of sweep | ours, tuned | best config |")
    say("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for r in results["rows"]:
        best = r["sweep"].get(r["best"], {}) if r["best"] else {}
        cells = [f"{r[k]['us']:.1f} ({r[k]['TBps']:.2f})" for k in ("bf16", "tinygemm")]
        cells.append(f"{best['us']:.1f} ({best['TBps']:.2f})" if best else "failed")
        cells.append(f"{r['tuned_us']:.1f}" if r.get("tuned_us") else "-")
        say(f"| {r['shape']} | {r['part']} | " + " | ".join(cells) + f" | {r['best']} |")


if __name__ == "__main__":
    main()
