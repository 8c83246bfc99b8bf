"""Times ways of writing one-token attention over a static cache, as the fast decoder's step
runs them (compiled, replayed from a CUDA graph, once per layer), for the Falcon-7B and -40B
head layouts, and the flash-decoding kernels (chat/engine/attention.py) in a few block
shapes at several positions. Prints microseconds per layer for each variant.

    PYTHONUNBUFFERED=1 python bench/decode_attention.py            # --flash-only: the kernels alone
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.gpu_decode import graph_ms
from chat.engine.attention import FlashDecode

LAYOUTS = {"7b": (1, 71, 64), "40b": (8, 16, 64)}  # kv heads, queries per kv head, head dim
MAX_LEN, POS, LAYERS = 2048, 700, 32
FLASH_POSITIONS = (130, 384, 700, 2047)  # the decode bench's prompt and reply span 128 to 384
FLASH_CONFIGS = [  # block_n, block_g, max_splits, num_warps; the first is the default
    (32, 16, 64, 4),
    (64, 16, 32, 4),
    (16, 16, 128, 4),
    (64, 32, 32, 4),
    (64, 128, 32, 8),
]


def scores_sum(q, k, visible):
    s = (q[:, :, None, :].float() * k[:, None].float()).sum(-1) / math.sqrt(q.shape[-1])
    return s.masked_fill(~visible, -math.inf).softmax(-1)


def scores_bmm(q, k, visible):
    s = torch.matmul(q, k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
    return s.masked_fill(~visible, -math.inf).softmax(-1)


def pv_sum(p, v):
    return (p[..., None] * v[:, None].float()).sum(-2).to(v.dtype)


def pv_chunked(p, v):
    kv, group, length = p.shape
    pc = p.view(kv, group, 16, length // 16, 1)
    vc = v.float().view(kv, 1, 16, length // 16, v.shape[-1])
    return (pc * vc).sum(-2).sum(-2).to(v.dtype)


def pv_bmm(p, v):
    return torch.matmul(p.to(v.dtype), v)


def sdpa_efficient(q, k, v, visible):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kv, group, d = q.shape
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        return F.scaled_dot_product_attention(
            q.reshape(1, kv * group, 1, d),
            k.repeat_interleave(group, 0)[None],
            v.repeat_interleave(group, 0)[None],
            attn_mask=visible[None, None].expand(1, kv * group, 1, -1),
        )


def bench_flash(name, kv, group, d) -> None:
    """The Triton kernels: error against float64 and us per layer, per block shape and position."""
    for block_n, block_g, max_splits, warps in FLASH_CONFIGS:
        flash = FlashDecode(
            kv,
            group,
            d,
            MAX_LEN,
            "cuda",
            block_n=block_n,
            block_g=block_g,
            max_splits=max_splits,
            num_warps=warps,
        )
        caches = [
            (
                torch.randn(kv, MAX_LEN, d, dtype=torch.bfloat16, device="cuda"),
                torch.randn(kv, MAX_LEN, d, dtype=torch.bfloat16, device="cuda"),
            )
            for _ in range(LAYERS)
        ]
        q = torch.randn(kv, group, d, dtype=torch.bfloat16, device="cuda")
        out = torch.empty(1, kv * group * d, dtype=torch.bfloat16, device="cuda")
        pos = torch.tensor([0], device="cuda")
        timings, errors = [], []
        for position in FLASH_POSITIONS:
            pos.fill_(position)
            k, v = caches[0]
            out.fill_(float("nan"))
            flash(q, k, v, pos, out)
            s = (q.double() @ k.double().transpose(-1, -2))[..., : position + 1] / math.sqrt(d)
            reference = (s.softmax(-1) @ v[:, : position + 1].double()).reshape(-1)
            errors.append(((out[0].double() - reference).norm() / reference.norm()).item())
            # One graph over 32 layers' caches, as the step runs it (no cache reuse between layers).
            ms = graph_ms(lambda: [flash(q, k, v, pos, out) for k, v in caches])
            timings.append(f"{position + 1}: {ms / LAYERS * 1e3:.1f}")
        print(
            f"{name} flash block_n {block_n} block_g {flash.block_g} splits {flash.splits} warps {warps}: "
            f"us/layer by length {', '.join(timings)} (max relative error {max(errors):.1e})",
            flush=True,
        )


def main() -> None:
    for name, (kv, group, d) in LAYOUTS.items():
        bench_flash(name, kv, group, d)
    if "--flash-only" in sys.argv:
        return
    for name, (kv, group, d) in LAYOUTS.items():
        q = torch.randn(kv, group, d, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(kv, MAX_LEN, d, dtype=torch.bfloat16, device="cuda")
        v = torch.randn(kv, MAX_LEN, d, dtype=torch.bfloat16, device="cuda")
        visible = (torch.arange(MAX_LEN, device="cuda") <= POS)[None]
        reference = (
            torch.softmax(
                (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(d)
                + torch.where(visible, 0.0, -math.inf).double(),
                -1,
            )
            @ v.double()
        )
        compiled = {}
        with inductor_config.patch(coordinate_descent_tuning=True):
            for fn in (scores_sum, scores_bmm, pv_sum, pv_chunked, pv_bmm):
                compiled[fn.__name__] = torch.compile(fn, fullgraph=True, dynamic=False)
            p = compiled["scores_sum"](q, k, visible)
            for s_name in ("scores_sum", "scores_bmm"):
                ms = graph_ms(lambda: [compiled[s_name](q, k, visible) for _ in range(LAYERS)])
                print(f"{name} {s_name}: {ms / LAYERS * 1e3:.1f} us/layer", flush=True)
            for pv_name in ("pv_sum", "pv_chunked", "pv_bmm"):
                out = compiled[pv_name](p, v)
                error = ((out.double() - reference).norm() / reference.norm()).item()
                ms = graph_ms(lambda: [compiled[pv_name](p, v) for _ in range(LAYERS)])
                print(
                    f"{name} {pv_name}: {ms / LAYERS * 1e3:.1f} us/layer (relative error {error:.1e})",
                    flush=True,
                )
        try:
            out = sdpa_efficient(q, k, v, visible)
            error = ((out.reshape(kv, group, d).double() - reference).norm() / reference.norm()).item()
            ms = graph_ms(lambda: [sdpa_efficient(q, k, v, visible) for _ in range(LAYERS)])
            print(
                f"{name} sdpa efficient (whole attention): {ms / LAYERS * 1e3:.1f} us/layer (error {error:.1e})",
                flush=True,
            )
        except Exception as error:  # a variant that does not run is a result too
            print(f"{name} sdpa efficient: failed: {type(error).__name__}: {str(error)[:200]}", flush=True)


if __name__ == "__main__":
    main()
