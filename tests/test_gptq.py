"""GPTQ 4-bit checkpoints into int4 (chat/engine/int4/gptq.py): every weight kept, the fast path's
tokens equal to transformers' over the same weights, and what cannot map refused clearly.

The checkpoints are the tiny offline Falcon quantized here (round to nearest, per group) and
written as AutoGPTQ writes them: `_autogptq_pack` follows AutoGPTQ's `QuantLinear.pack`
(auto_gptq/nn_modules/qlinear/qlinear_cuda.py) loop for loop, independently of the loader, with
the config in config.json's "quantization_config" as TheBloke's later uploads have it (or in
quantize_config.json, as the earlier ones). No real GPTQ checkpoint is on this machine.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from chat.config import Settings
from chat.conversation.errors import ConfigError
from chat.engine.int4 import gemv as int4_gemv
from chat.engine.int4 import weight as int4
from chat.factory import build_backend
from tests.quantized_checkpoints import (
    assert_greedy_equals_generate,
    assert_serves_and_saves,
    hold_int4_layout,
    load_int4,
    scaled_levels,
    split_layer,
    write_checkpoint,
)


def _round_to_nearest(weight: torch.Tensor, group: int, sym: bool):
    """GPTQ's quantizer without the Hessian updates: levels q [out, in], zeros and fp16 scales
    [groups, out] (the weights are only the raw material here; any q, zero, scale would do). The
    last group may be shorter, as GPTQ's are where the group size does not divide the row."""
    qs, zeros, scales = [], [], []
    for first in range(0, weight.shape[1], group):
        w = weight[:, first : first + group].float()
        if sym:
            scale = (w.abs().amax(-1) / 7.5).clamp_min(1e-6)
            zero = torch.full_like(scale, 8)
        else:
            low, high = w.amin(-1).clamp_max(0), w.amax(-1).clamp_min(0)
            scale = ((high - low) / 15).clamp_min(1e-6)
            zero = (-low / scale).round().clamp(1, 15)  # v1 cannot store a zero of 0 (zero - 1 < 0)
        scale = scale.half()
        qs.append((w / scale.float()[:, None] + zero[:, None]).round().clamp(0, 15))
        zeros.append(zero)
        scales.append(scale)
    return torch.cat(qs, 1).int(), torch.stack(zeros).int(), torch.stack(scales)


def _autogptq_pack(q: torch.Tensor, zero: torch.Tensor, checkpoint_format: str):
    """qweight [in / 8, out] and qzeros [groups, out / 8], int32, as AutoGPTQ's `pack` builds them:
    eight 4-bit values per uint32, value j of eight at bit 4j; v1 ("gptq") stores zero - 1."""
    intweight = q.t().contiguous().numpy().astype(np.uint32)  # [in, out]
    qweight = np.zeros((intweight.shape[0] // 32 * 4, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + 8):
            qweight[row] |= intweight[j] << (4 * (j - i))
        i += 8
        row += 1
    zeros = (zero - 1 if checkpoint_format == "gptq" else zero).numpy().astype(np.uint32)
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // 32 * 4), dtype=np.uint32)
    i = col = 0
    while col < qzeros.shape[1]:
        for j in range(i, i + 8):
            qzeros[:, col] |= zeros[:, j] << (4 * (j - i))
        i += 8
        col += 1
    return torch.from_numpy(qweight.astype(np.int32)), torch.from_numpy(qzeros.astype(np.int32))


def write_gptq(
    folder,
    tiny_model_dir,
    *,
    checkpoint_format="gptq",
    sym=False,
    group_size=32,
    desc_act=False,
    permute=False,
    bits=4,
    shards=2,
    config_file="config.json",
) -> dict:
    """The tiny Falcon as a GPTQ checkpoint in `folder`; returns each linear layer's raw
    (q [out, in], zero [groups, out], scale [groups, out] fp16, group size)."""
    quantization = {
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "damp_percent": 0.1,
        "true_sequential": True,
        "static_groups": False,
    }
    if checkpoint_format != "gptq":
        quantization["checkpoint_format"] = checkpoint_format
    if config_file == "config.json":
        quantization["quant_method"] = "gptq"
    raw = {}

    def pack(module, weight):
        in_features = weight.shape[1]
        group = in_features if group_size == -1 else group_size
        q, zero, scale = _round_to_nearest(weight, group, sym)
        qweight, qzeros = _autogptq_pack(q, zero, checkpoint_format)
        g_idx = torch.arange(in_features, dtype=torch.int32) // group
        if permute:  # act order: g_idx follows the permuted order of the columns
            g_idx = g_idx[torch.randperm(in_features, generator=torch.Generator().manual_seed(0))]
        raw[module] = (q, zero, scale, group)
        return {"qweight": qweight, "qzeros": qzeros, "scales": scale, "g_idx": g_idx}

    write_checkpoint(folder, tiny_model_dir, quantization, config_file, pack, shards)
    return raw


def gptq_weight(raw) -> torch.Tensor:
    """GPTQ's own dequantization, straight from the raw values: scale * (q - zero), float32."""
    return scaled_levels(*raw)


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("gptq") / "tiny-gptq"
    return folder, write_gptq(folder, tiny_model_dir)


@pytest.fixture(scope="module")
def gptq_model(gptq_dir):
    return load_int4(gptq_dir[0])


@pytest.mark.parametrize(
    "checkpoint_format, sym, group_size, desc_act",
    [
        ("gptq", False, 32, False),
        ("gptq", True, 64, False),
        ("gptq_v2", False, 32, False),
        ("gptq", False, 128, False),  # 128 over 64 columns: one short group, as 7B's 4,544 has
        ("gptq", True, -1, True),  # act order over one group per row: g_idx all 0, lossless
    ],
)
def test_every_gptq_weight_is_kept_exactly(
    tmp_path, tiny_model_dir, checkpoint_format, sym, group_size, desc_act
):
    folder = tmp_path / "gptq"
    raw = write_gptq(
        folder,
        tiny_model_dir,
        checkpoint_format=checkpoint_format,
        sym=sym,
        group_size=group_size,
        desc_act=desc_act,
        shards=1,
    )
    model = load_int4(folder)
    shapes = {name: tuple(values[0].shape) for name, values in raw.items()}
    for index in range(model.config.num_hidden_layers):
        for name, weight in split_layer(model, index, shapes).items():
            assert torch.equal(weight, gptq_weight(raw[name])), name
    for name in ("h.0.in", "h.0.out"):  # symmetric: -8 * scale is exact in fp16; else float32
        assert model.products[name].scale.dtype == torch.float16
        assert model.products[name].offset.dtype == (torch.float16 if sym else torch.float32)
    assert model.quantization.method == "GPTQ"


def test_gptq_fast_path_greedy_equals_generate_over_the_same_weights(
    tiny_model_dir, tiny_tokenizer, gptq_dir, gptq_model
):
    """transformers' Falcon holding GPTQ's weights (scale * (q - zero), straight from the raw
    values) against the fast decoder on the loaded GPTQ model."""
    weights = {name: gptq_weight(values) for name, values in gptq_dir[1].items()}
    assert_greedy_equals_generate(tiny_model_dir, tiny_tokenizer, gptq_model, weights)


def test_quantize_int4_serves_a_gptq_checkpoint_end_to_end(gptq_dir, tmp_path):
    assert_serves_and_saves(gptq_dir[0], tmp_path / "saved")


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(desc_act=True, permute=True), "act order .* without act order"),
        (dict(bits=8), "8 bits: only 4-bit"),
        (dict(group_size=16), "group size 16"),
        (dict(checkpoint_format="marlin"), "format 'marlin'"),
        (dict(config_file="quantize_config.json", desc_act=True, permute=True), "act order"),
    ],
)
def test_what_does_not_map_without_loss_is_a_clear_start_up_error(tmp_path, tiny_model_dir, options, message):
    folder = tmp_path / "gptq"
    write_gptq(folder, tiny_model_dir, shards=1, **options)
    with pytest.raises(ConfigError, match=f"--quantize int4: .*{message}"):
        build_backend(Settings(model=str(folder), quantize="int4"))


def test_a_split_safetensors_file_asks_to_be_joined(tmp_path, tiny_model_dir):
    folder = tmp_path / "split"
    write_gptq(folder, tiny_model_dir, shards=1)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors-split-a").write_bytes(data[: len(data) // 2])
    (folder / "model.safetensors-split-b").write_bytes(data[len(data) // 2 :])
    with pytest.raises(ConfigError, match="join them"):
        build_backend(Settings(model=str(folder), quantize="int4"))


@pytest.mark.skipif(
    int4_gemv.triton is None or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs a CUDA GPU or Triton's interpreter",
)
def test_our_gemv_reads_gptqs_fp16_scales_and_float32_offsets(gptq_model):
    """The GEMV and its dense read-back take the converted weight's dtypes as they are (Triton
    on a GPU, or its interpreter on the CPU): the read-back is every GPTQ weight exactly."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    weight = gptq_model.products["h.0.out"]  # [dense | 4h_to_h], asymmetric: float32 offsets
    assert (weight.scale.dtype, weight.offset.dtype) == (torch.float16, torch.float32)
    words, scale, offset = (t.to(device) for t in int4_gemv.pack(weight))
    exact = int4.dequantize(weight)
    assert torch.equal(int4_gemv.dense_by_triton(words, scale, offset, torch.float32).T.cpu(), exact)
    x = torch.randn(2, weight.shape[1], generator=torch.Generator().manual_seed(2))
    out = int4_gemv.gemv(x.to(device), words, scale, offset, int4_gemv.Config(64, 2, 4, 1)).cpu()
    expected = x.double() @ exact.double().T
    limit = 3e-3 if torch.cuda.is_available() else 1e-5  # fp16x2 products on a GPU
    assert ((out.double() - expected).norm() / expected.norm()).item() < limit


def test_a_gptq_checkpoint_loads_on_one_gpu_only(gptq_dir):
    with pytest.raises(ConfigError, match="GPTQ checkpoint on one GPU: use --tensor-parallel 1"):
        build_backend(Settings(model=str(gptq_dir[0]), quantize="int4", tensor_parallel=2))


def test_falcon3s_published_gptq_settings_load_exactly_on_the_llama_layout(
    tmp_path, tiny_model_dir, tiny_tokenizer
):
    """tiiuae/Falcon3-7B-Instruct-GPTQ-Int4's quantize_config.json (read with the search tool, no
    checkpoint fetched): bits 4, group_size 128, desc_act false, sym true, checkpoint_format gptq.
    A tiny Llama packed so: every weight kept, the fast path's tokens those of `generate`."""
    from tests.test_llama_layout import save_with_tokenizer, tiny_llama

    llama = tiny_llama(len(tiny_tokenizer), hidden_size=128, head_dim=32, num_attention_heads=4)
    llama_dir = save_with_tokenizer(llama, tmp_path / "bf16", tiny_model_dir)
    settings = dict(sym=True, group_size=128, desc_act=False, checkpoint_format="gptq")
    raw = write_gptq(tmp_path / "gptq", llama_dir, shards=1, config_file="quantize_config.json", **settings)
    model = load_int4(tmp_path / "gptq")
    assert model.quantization.method == "GPTQ" and model.layout.family == "llama"
    weights = {name: gptq_weight(values) for name, values in raw.items()}
    assert len(weights) == 2 * 7  # q, k, v, o, gate, up, down in each of the two layers
    held = tiny_llama(len(tiny_tokenizer), hidden_size=128, head_dim=32, num_attention_heads=4)
    hold_int4_layout(held, model.layout)  # the layout's products taken apart again
    for name, weight in weights.items():
        assert torch.equal(held.get_submodule(name).weight, weight), name
    assert_greedy_equals_generate(llama_dir, tiny_tokenizer, model, weights)
