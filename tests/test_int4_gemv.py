"""Our int4 GEMV (chat/engine/int4/gemv.py) and the Triton read-back of tinygemm's tiles.

The layout and the CPU path are checked everywhere; the Triton kernels run on a GPU, or in
Triton's interpreter on the CPU (conftest sets TRITON_INTERPRET=1 there; Triton comes from
requirements-test.txt), each against the float32 product of the dequantized weight.
"""

from __future__ import annotations

import os

import pytest
import torch

from chat.engine.int4 import gemv as int4_gemv
from chat.engine.int4 import linear as int4_linear
from chat.engine.int4 import rows as int4_rows
from chat.engine.int4 import weight as int4
from chat.engine.int4.products import Int4Reference, Int4Triton

CUDA = torch.cuda.is_available()
RUNS_TRITON = int4_gemv.triton is not None and (CUDA or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton = pytest.mark.skipif(not RUNS_TRITON, reason="needs a CUDA GPU or Triton's interpreter")
DEVICE = "cuda" if CUDA else "cpu"


def _weight(rows, cols, group_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, cols, generator=generator) * 0.02
    dense[:, 3] += 0.5  # an outlier column: groups differ in scale and offset
    return int4.quantize(dense, group_size, search="none", dtype=torch.float32)


@pytest.mark.parametrize("group_size", [128, 64, 32])
def test_layout_keeps_every_level_and_the_dequantized_weight(group_size):
    weight = _weight(40, 256, group_size)
    words, scale, offset = int4_gemv.pack(weight, rows_per_chunk=16)  # several chunks
    assert words.shape == (256 // group_size, 40, group_size // 8)
    assert torch.equal(int4_gemv.levels(words), int4.unpack(weight.packed))
    assert torch.equal(int4_gemv.dequantize(words, scale, offset, torch.float32).T, int4.dequantize(weight))


def test_triton_adapter_multiplies_like_the_reference_on_the_cpu():
    weight = _weight(48, 256, 128)
    bias = torch.randn(48)
    x = torch.randn(3, 256)
    expected = Int4Reference.linear(x, *Int4Reference.from_int4(weight, bias))
    packed = Int4Triton.from_int4(weight, bias)
    assert torch.allclose(Int4Triton.linear(x, *packed), expected, atol=1e-5)
    prompt = torch.randn(int4_linear.PROMPT_ROWS + 3, 256)  # the dense path
    assert torch.allclose(
        Int4Triton.linear(prompt, *packed),
        Int4Reference.linear(prompt, *Int4Reference.from_int4(weight, bias)),
        atol=1e-5,
    )


@needs_triton
@pytest.mark.parametrize(
    ("rows", "cols", "group_size", "batch", "config"),
    [
        (96, 512, 128, 1, int4_gemv.Config(64, 1, 4, 1)),
        (96, 512, 128, 2, int4_gemv.Config(32, 4, 4, 1, prefetch=True)),  # split in 4, ragged columns
        (200, 384, 128, 1, int4_gemv.Config(128, 3, 4, 1)),  # 3 groups in 3 slices
        (130, 512, 64, 3, int4_gemv.Config(64, 8, 4, 1, prefetch=True)),
        (64, 256, 32, 1, int4_gemv.Config(64, 2, 4, 1)),
        (72, 384, 128, 1, int4_gemv.Config(64, 2, 4, 1)),  # 3 groups in slices of 2 and 1
        (64, 704, 64, 2, int4_gemv.Config(32, 4, 4, 1, prefetch=True)),  # 11 groups: 3, 3, 3, 2
    ],
)
def test_gemv_equals_the_float32_product(rows, cols, group_size, batch, config):
    weight = _weight(rows, cols, group_size, seed=rows)
    packed = [t.to(DEVICE) for t in int4_gemv.pack(weight)]
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    exact = x.double() @ int4.dequantize(weight).double().T.to(DEVICE)
    out = int4_gemv.gemv(x, *packed, config)
    assert out.shape == (batch, rows)
    # float32 arithmetic in the interpreter; on a GPU fp16x2 products (2**-11 each)
    limit = 3e-3 if CUDA and config.half2 else 1e-5
    assert ((out.double() - exact).norm() / exact.norm()).item() < limit


@needs_triton
@pytest.mark.parametrize(
    ("rows", "cols", "group_size", "config"),
    [
        (96, 512, 128, int4_rows.RowsConfig(64, 1, 4, 1)),
        (130, 704, 64, int4_rows.RowsConfig(64, 4, 4, 1)),  # 11 groups in slices of 3, 3, 3, 2
        (64, 256, 32, int4_rows.RowsConfig(32, 2, 4, 1, biased=False)),
        (200, 384, 128, int4_rows.RowsConfig(128, 3, 4, 1)),  # ragged outputs
    ],
)
def test_the_rows_product_equals_the_float32_product_and_each_row_is_the_same_alone(
    rows, cols, group_size, config
):
    """A verify step's 2-8 rows read the weight once (int4/rows.py); a row's result must not
    depend on the rows beside it, so a token decoded alone and in a verify step match bit for bit."""
    weight = _weight(rows, cols, group_size, seed=rows)
    packed = [t.to(DEVICE) for t in int4_gemv.pack(weight)]
    x = torch.randn(8, cols, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    exact = x.double() @ int4.dequantize(weight).double().T.to(DEVICE)
    out = int4_rows.gemm_rows(x, *packed, config)
    assert out.shape == (8, rows)
    assert ((out.double() - exact).norm() / exact.norm()).item() < 3e-5  # float32, 128 + q levels
    for count in (1, 2, 5):
        assert torch.equal(int4_rows.gemm_rows(x[:count], *packed, config), out[:count])


@pytest.mark.skipif(
    not CUDA, reason="bf16 products on the tensor cores: a GPU (the interpreter's bf16 dot is not exact)"
)
@pytest.mark.parametrize("biased", [True, False])
def test_the_rows_product_in_bf16_is_within_bf16s_error_and_each_row_the_same_alone(biased):
    weight = _weight(200, 512, 128, seed=9)
    packed = [
        t.to("cuda", torch.bfloat16) if t.is_floating_point() else t.to("cuda")
        for t in int4_gemv.pack(weight)
    ]
    x = torch.randn(8, 512, generator=torch.Generator().manual_seed(4)).to("cuda", torch.bfloat16)
    exact = x.double() @ int4.dequantize(weight).to(torch.bfloat16).double().T.cuda()
    config = int4_rows.RowsConfig(64, 2, 4, 3, biased=biased)
    out = int4_rows.gemm_rows(x, *packed, config)
    assert ((out.double() - exact).norm() / exact.norm()).item() < 1e-2
    for count in (1, 2, 5):
        assert torch.equal(int4_rows.gemm_rows(x[:count], *packed, config), out[:count])


def test_the_rows_product_serves_only_where_tuning_found_a_configuration(monkeypatch):
    """On a GPU where no candidate compiles or matches, a verify step's rows fall back to the
    per-row GEMV (int4_linear) instead of failing the decoder's start."""
    monkeypatch.setattr(int4_rows, "_chosen", {})
    monkeypatch.setattr(int4_rows, "_unusable", set())
    packed = int4_gemv.pack(_weight(48, 256, 128))
    x = torch.randn(4, 256)
    monkeypatch.setattr(int4_rows, "tune", lambda *args: {})
    assert not int4_rows.usable(x, *packed)
    monkeypatch.setattr(int4_rows, "tune", lambda *args: pytest.fail("tuned the same shape again"))
    assert not int4_rows.usable(x, *packed)

    def tune(x, words, scale, offset):
        int4_rows._chosen[int4_rows._key(x, words)] = int4_rows.DEFAULT
        return {int4_rows.DEFAULT: 1.0}

    monkeypatch.setattr(int4_rows, "tune", tune)
    assert int4_rows.usable(x[:3], *packed)


@needs_triton
def test_x_is_packed_in_fp16_pairs_as_the_nibbles_pair():
    """Word t of a group holds columns t + i * G / 8 in nibble i; the fp16x2 path multiplies
    nibbles (0, 4), (1, 5), (2, 6), (3, 7) together, so x must be paired the same way."""
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(3))
    packed, sums = int4_gemv.pack_x(x.to(DEVICE), n_groups=4)
    by_group = x.view(2, 4, 8, 16)  # [rows, groups, nibble i, t]
    lo = by_group[:, :, :4].half().view(torch.int16).to(torch.int32) & 0xFFFF
    hi = by_group[:, :, 4:].half().view(torch.int16).to(torch.int32) << 16
    assert torch.equal(packed.cpu(), lo | hi)
    assert torch.allclose(sums.cpu(), by_group.sum(dim=(2, 3)), atol=1e-5)


@needs_triton
def test_dense_read_back_equals_the_dequantized_weight():
    weight = _weight(300, 512, 64)
    words, scale, offset = (t.to(DEVICE) for t in int4_gemv.pack(weight))
    dense = int4_gemv.dense_by_triton(words, scale, offset, torch.float32)
    assert torch.equal(dense.T.cpu(), int4.dequantize(weight))


@needs_triton
@pytest.mark.parametrize("tiles", [2, 8])
def test_tinygemm_tiles_read_back_by_triton_equal_the_torch_read_back(tiles):
    from chat.engine.int4.tinygemm_tiles import TileOrder, dense_weight, swap_nibbles
    from tests.helpers import fake_tinygemm_pack

    weight = _weight(32, 512, 64)
    levels = int4.unpack(weight.packed)
    tiled = fake_tinygemm_pack(swap_nibbles(levels), tiles)
    order = TileOrder(tiles, "cpu", pack=fake_tinygemm_pack)
    scale, zero = weight.scale.float(), weight.offset.float() + 8 * weight.scale.float()
    scale_zero = torch.stack((scale, zero), dim=-1).transpose(0, 1)
    by_torch = dense_weight(tiled, scale_zero, order, torch.float32, kernel=False)
    by_triton = dense_weight(tiled.to(DEVICE), scale_zero.to(DEVICE), order, torch.float32, kernel=True)
    assert torch.equal(by_triton.cpu(), by_torch)
    assert torch.allclose(by_torch, int4.dequantize(weight), atol=1e-6)
