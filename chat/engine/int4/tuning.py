"""Choosing a kernel configuration for a weight's shape by timing the candidates the way the
decoder runs them: replayed from a CUDA graph, over enough copies of the weight that the L2 cache
holds none of it between calls.

The first tuner timed each candidate with `triton.testing.do_bench`, which times calls one by
one, launches included: in the H200 sweep (bench/results/h200-int4-gemv.json) it timed the
configurations it picked 8-28 us above their graph time, and on Falcon-7B's fused input product
and LM head it picked ones the sweep timed at 31.0 and 68.4 us where a candidate ran 27.0 and 56.2
(and the sweep's best, 24.7 and 55.4, were not candidates: they are now). Timing as the sweep
times (bench/int4_gemv.py: graphs over copies) removes that difference by construction; the
sweep's "tuned" column checks it on each GPU.
"""

from __future__ import annotations

import math

import torch

MAX_COPIES = 8  # of a small weight, so the copies together pass 4x the L2
CHECK_OUTPUTS = 512  # outputs checked against float32: the float32 copy of a 180B weight is 3.5 GB


def tune(product, dequantize, table: dict, key, x, words, scale, offset, candidates) -> dict:
    """Time the candidates (`time_candidates`) and keep the fastest in `table[key]`."""
    times = time_candidates(product, dequantize, x, words, scale, offset, candidates)
    if times:
        table[key] = min(times, key=times.get)
    return times


def time_candidates(product, dequantize, x, words, scale, offset, candidates) -> dict:
    """Microseconds per call of `product(x, words, scale, offset, config)` (gemv.pack's weight)
    for each candidate that compiles, runs and matches the float32 product of the weight
    `dequantize` gives within 1% (on its first outputs); the others are left out."""
    sample = min(CHECK_OUTPUTS, words.shape[1])
    head = (t[:, :sample].contiguous() for t in (words, scale, offset))
    exact = x.float() @ dequantize(*head, x.dtype).float()
    l2 = torch.cuda.get_device_properties(x.device).L2_cache_size
    nbytes = sum(t.numel() * t.element_size() for t in (words, scale, offset))
    copies = [(words, scale, offset)] + [
        (words.clone(), scale.clone(), offset.clone())
        for _ in range(min(MAX_COPIES, math.ceil(4 * l2 / nbytes)) - 1)
    ]
    times = {}
    for config in candidates:
        try:
            out = product(x, words, scale, offset, config)[:, :sample].float()
            if not ((out - exact).norm() / exact.norm()).item() <= 1e-2:
                continue
            times[config] = graph_us(lambda c=config: [product(x, *w, c) for w in copies]) / len(copies)
        except Exception:  # a configuration this GPU cannot compile or run
            continue
    return times


def graph_us(function, replays: int = 10) -> float:
    """Microseconds per call of `function` (its first calls compile) replayed from a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            function()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        function()
    for _ in range(2):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / replays
