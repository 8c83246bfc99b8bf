"""The flash-decoding kernels against the torch reference (attention.py).

They run on a CUDA GPU (bfloat16, as the fast decoder uses them) and skip elsewhere. Without a GPU,
with Triton installed, `TRITON_INTERPRET=1 python -m pytest tests/test_decode_attention.py` runs
them in Triton's interpreter on the CPU in float32 (its bfloat16 products are wrong).
"""

from __future__ import annotations

import os

import pytest
import torch

from chat.engine import attention as decode_attention
from chat.engine.attention import FlashDecode, attend_reference

CUDA = torch.cuda.is_available()
INTERPRETED = not CUDA and os.environ.get("TRITON_INTERPRET") == "1" and decode_attention.triton is not None
pytestmark = pytest.mark.skipif(not (CUDA or INTERPRETED), reason="needs a CUDA GPU (or TRITON_INTERPRET=1)")
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32

LAYOUTS = {  # kv heads, queries per kv head, head dim, cache length
    "falcon-7b": (1, 71, 64, 2048),
    "falcon-40b": (8, 16, 64, 2048),
    "tiny": (1, 4, 16, 128),
    "uneven-cache": (2, 5, 32, 1000),
    "falcon3": (4, 3, 256, 320),  # the Llama layout's Falcon3: 12 queries over 4 KV heads of 256
}


def _inputs(kv, group, d, max_len, generator):
    def draw(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE, DTYPE)

    return draw(kv, group, d), draw(kv, max_len, d), draw(kv, max_len, d)


def _relative_error(out, reference):
    return ((out.double() - reference).norm() / reference.norm()).item()


def _reference64(q, k, v, pos):
    out = torch.empty(q.numel(), dtype=torch.float64, device=DEVICE)
    positions = torch.arange(k.shape[1], device=DEVICE)
    attend_reference(q.double(), k.double(), v.double(), pos, positions, out)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_flash_decoding_computes_what_the_torch_reference_does(layout):
    kv, group, d, max_len = LAYOUTS[layout]
    flash = FlashDecode(kv, group, d, max_len, DEVICE)
    generator = torch.Generator().manual_seed(list(LAYOUTS).index(layout))
    n = kv * group * d
    for position in (0, 1, 63, 64, 65, 300, max_len // 2 + 7, max_len - 1):
        q, k, v = _inputs(kv, group, d, max_len, generator)  # fresh inputs for every check
        pos = torch.tensor([position], device=DEVICE)
        out = torch.full((1, n + 8), float("nan"), dtype=DTYPE, device=DEVICE)  # poisoned
        flash(q, k, v, pos, out)
        torch_out = torch.empty(n, dtype=DTYPE, device=DEVICE)
        attend_reference(q, k, v, pos, torch.arange(max_len, device=DEVICE), torch_out)
        exact = _reference64(q, k, v, pos)
        assert not out[0, :n].isnan().any(), "every output element is written"
        assert out[0, n:].isnan().all(), "nothing after the attention part is touched"
        # bf16 output: ~1e-3 from rounding alone; the torch path rounds the same way.
        error, torch_error = _relative_error(out[0, :n], exact), _relative_error(torch_out, exact)
        assert error < (4e-3 if torch.bfloat16 == DTYPE else 1e-5), (position, error)
        assert error <= 1.2 * torch_error + 1e-6, (position, error, torch_error)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_one_captured_graph_follows_the_position_tensor():
    kv, group, d, max_len = LAYOUTS["falcon-7b"]
    flash = FlashDecode(kv, group, d, max_len, DEVICE)
    q, k, v = _inputs(kv, group, d, max_len, torch.Generator().manual_seed(3))
    pos = torch.tensor([10], device=DEVICE)
    out = torch.empty(1, kv * group * d, dtype=DTYPE, device=DEVICE)
    flash(q, k, v, pos, out)  # compiles the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        flash(q, k, v, pos, out)
    for position in (5, 700, 2047, 64):
        pos.fill_(position)
        out.fill_(float("nan"))
        graph.replay()
        assert _relative_error(out[0], _reference64(q, k, v, pos)) < 4e-3, position


@pytest.mark.parametrize("layout", ["falcon-7b", "falcon-40b", "tiny", "falcon3"])
def test_rotary_cache_write_and_gelu_are_those_of_the_torch_step(layout):
    """Falcon's layouts hand the kernel h (GELU'd beside attention); the Llama layout (falcon3)
    has none there: its MLP comes after attention."""
    import torch.nn.functional as F

    from chat.engine.layout import split_rotate

    kv, group, d, max_len = LAYOUTS[layout]
    flash = FlashDecode(kv, group, d, max_len, DEVICE, DTYPE)
    generator = torch.Generator().manual_seed(7)

    def draw(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE, DTYPE)

    parallel = layout != "falcon3"
    n_qkv, n_attn, n_h = kv * (group + 2) * d, kv * group * d, 4 * kv * group * d * parallel
    fused = draw(1, n_qkv + n_h)  # the input product's output: [qkv | h], as the one-norm layout
    qkv, h = fused[:, :n_qkv], (fused[:, n_qkv:] if parallel else None)
    angles = torch.arange(max_len, dtype=torch.float32)[:, None] * torch.rand(d // 2, generator=generator)
    table = torch.cat((angles, angles), -1)
    cos, sin = table.cos().to(DEVICE, DTYPE), table.sin().to(DEVICE, DTYPE)
    k_cache, v_cache = draw(kv, max_len, d), draw(kv, max_len, d)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    joined = torch.full((1, n_attn + n_h), float("nan"), dtype=DTYPE, device=DEVICE)
    position = max_len // 3
    pos = torch.tensor([position], device=DEVICE)

    q = flash.rotate_and_store(qkv, h, cos, sin, pos, k_cache, v_cache, joined)

    # The torch step's arithmetic, in float32 from the same inputs, rounded once.
    row = slice(position, position + 1)
    q_ref, k_ref, v_ref = split_rotate(qkv.float(), cos[row].float(), sin[row].float(), kv, group, d)
    close = dict(rtol=1e-2, atol=1e-2) if torch.bfloat16 == DTYPE else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q, q_ref[0].to(DTYPE), **close)
    torch.testing.assert_close(k_cache[:, position], k_ref[0].to(DTYPE), **close)
    torch.testing.assert_close(v_cache[:, position], v_ref[0].to(DTYPE), rtol=0, atol=0)
    if parallel:
        torch.testing.assert_close(joined[:, n_attn:], F.gelu(h.float()).to(DTYPE), **close)
    assert joined[:, :n_attn].isnan().all(), "the attention part is left for attention"
    others = torch.arange(max_len, device=DEVICE) != position
    assert torch.equal(k_cache[:, others], k_before[:, others]) and torch.equal(
        v_cache[:, others], v_before[:, others]
    )
