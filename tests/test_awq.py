"""AutoAWQ "GEMM" 4-bit checkpoints into int4 (chat/engine/int4/awq.py): every weight kept, the fast
path's tokens equal to transformers' over the same weights, and what cannot map refused clearly.

The checkpoints are the tiny offline Falcon quantized here as AutoAWQ's `pseudo_quantize_tensor`
rounds (zero point, per group, without the activation-aware scale search: any levels would do)
and packed by `_autoawq_pack`, a copy of `WQLinear_GEMM.from_linear`'s loop (casper-hansen/AutoAWQ
awq/modules/linear/gemm.py), written independently of the loader; `_autoawq_dequantize` copies
AutoAWQ's `dequantize_gemm` (awq/utils/packing_utils.py), the weights AutoAWQ computes with. The
config is written as AutoAWQ writes it (quant_config.json, and config.json's "quantization_config"
by `to_transformers_dict`) or as transformers 5.23's own `AwqConfig.to_dict()` does. No real AWQ
checkpoint is on this machine.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chat.config import Settings
from chat.conversation.errors import ConfigError
from chat.engine.int4 import awq
from chat.engine.int4 import weight as int4
from chat.engine.int4.awq import AwqConfig
from chat.factory import build_backend
from tests.quantized_checkpoints import (
    assert_greedy_equals_generate,
    assert_serves_and_saves,
    load_int4,
    scaled_levels,
    split_layer,
    write_checkpoint,
)

AUTOAWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]  # from_linear's order_map for 4 bits
AUTOAWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # packing_utils.AWQ_REVERSE_ORDER


def _pseudo_quantize(weight: torch.Tensor, group: int):
    """AutoAWQ's zero-point quantizer on [out, in]: levels q [out, in], zeros [groups, out] and fp16
    scales [groups, out] (transposed as `_apply_quant` hands them to `from_linear`)."""
    out_features = weight.shape[0]
    w = weight.float().reshape(-1, group)
    max_val, min_val = w.amax(dim=1, keepdim=True), w.amin(dim=1, keepdim=True)
    scales = ((max_val - min_val).clamp(min=1e-5) / 15).half().float()
    zeros = (-torch.round(min_val / scales)).clamp_(0, 15)
    q = torch.clamp(torch.round(w / scales) + zeros, 0, 15)
    q = q.reshape(out_features, -1).int()
    return (
        q,
        zeros.view(out_features, -1).t().contiguous().int(),
        scales.view(out_features, -1).t().contiguous().half(),
    )


def _autoawq_pack(intweight: np.ndarray) -> torch.Tensor:
    """[rows, out] levels (or zeros) -> int32 [rows, out / 8], as `from_linear`'s two loops pack:
    value i of each eight at bits 4i, taken from column col * 8 + order_map[i]."""
    packed = np.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=np.uint32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= intweight[:, col * 8 + AUTOAWQ_ORDER_MAP[i]].astype(np.uint32) << (i * 4)
    return torch.from_numpy(packed.view(np.int32))


def _autoawq_dequantize(qweight, qzeros, scales, group: int) -> torch.Tensor:
    """AutoAWQ's `dequantize_gemm`: the fp16 weight [in, out] it multiplies by."""
    shifts = torch.arange(0, 32, 4)
    iweights = torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :]).to(torch.int8)
    izeros = torch.bitwise_right_shift(qzeros[:, :, None], shifts[None, None, :]).to(torch.int8)
    iweights, izeros = iweights.view(iweights.shape[0], -1), izeros.view(izeros.shape[0], -1)
    reverse = torch.arange(iweights.shape[-1]).view(-1, 8)[:, AUTOAWQ_REVERSE_ORDER].view(-1)
    iweights, izeros = iweights[:, reverse] & 15, izeros[:, reverse] & 15
    return (iweights - izeros.repeat_interleave(group, dim=0)) * scales.repeat_interleave(group, dim=0)


def _quantization(style: str, group_size: int, **overrides) -> tuple[dict, str]:
    """The config as `style` writes it, and the file it goes in."""
    if style == "autoawq":  # AutoAWQ's quant_config.json (AwqConfig.to_dict)
        fields = {
            "zero_point": True,
            "q_group_size": group_size,
            "w_bit": 4,
            "version": "GEMM",
            "modules_to_not_convert": None,
        }
        return {**fields, **overrides}, "quant_config.json"
    if style == "transformers":  # transformers 5.23's AwqConfig, as save_pretrained writes it
        from transformers import AwqConfig as TransformersAwqConfig

        return {**TransformersAwqConfig(group_size=group_size).to_dict(), **overrides}, "config.json"
    fields = {
        "quant_method": "awq",
        "zero_point": True,
        "group_size": group_size,
        "bits": 4,
        "version": "gemm",
        "modules_to_not_convert": None,
    }  # AutoAWQ's to_transformers_dict
    return {**fields, **overrides}, "config.json"


def write_awq(
    folder, tiny_model_dir, *, style="config.json", group_size=32, shards=2, act_scales=1.0, **overrides
) -> dict:
    """The tiny Falcon as an AutoAWQ GEMM checkpoint in `folder`, with Falcon's activation scales
    (`act_scales` everywhere; None: none written); returns each linear layer's (qweight, qzeros,
    scales, group size, q [out, in], zeros [groups, out])."""
    quantization, config_file = _quantization(style, group_size, **overrides)
    raw = {}

    def pack(module, weight):
        group = weight.shape[1] if group_size == -1 else group_size
        q, zeros, scales = _pseudo_quantize(weight, group)
        qweight, qzeros = _autoawq_pack(q.t().numpy()), _autoawq_pack(zeros.numpy())
        raw[module] = (qweight, qzeros, scales, group, q, zeros)
        return {"qweight": qweight, "qzeros": qzeros, "scales": scales}

    config = json.loads((tiny_model_dir / "config.json").read_text())
    ffn = 4 * config["hidden_size"]
    extra = {
        f"transformer.h.{i}.mlp.act.scales": torch.full((ffn,), act_scales, dtype=torch.float16)
        for i in range(config["num_hidden_layers"] if act_scales is not None else 0)
    }
    write_checkpoint(folder, tiny_model_dir, quantization, config_file, pack, shards, extra)
    return raw


def exact_weight(raw) -> torch.Tensor:
    """scale * (q - zero) [out, in] in float32, straight from the raw values (exact there)."""
    _, _, scales, group, q, zeros = raw
    return scaled_levels(q, zeros, scales, group)


@pytest.fixture(scope="module")
def awq_dir(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("awq") / "tiny-awq"
    return folder, write_awq(folder, tiny_model_dir)


@pytest.fixture(scope="module")
def awq_model(awq_dir):
    return load_int4(awq_dir[0])


def test_a_literal_awq_word_reads_its_outputs_in_order():
    """One word per input row whose nibbles hold, in AutoAWQ's order, levels 0..7 for outputs
    0..7: 0x75316420 (bits 4k hold output ORDER[k] = 0, 2, 4, 6, 1, 3, 5, 7)."""
    qweight = torch.full((32, 1), 0x75316420, dtype=torch.int32)
    parts = {
        "qweight": qweight,
        "qzeros": torch.zeros(1, 1, dtype=torch.int32),
        "scales": torch.ones(1, 8, dtype=torch.float16),
    }
    weight = int4.dequantize(AwqConfig(bits=4, group_size=32, version="gemm").to_int4(parts, 32))
    assert torch.equal(weight, torch.arange(8.0)[:, None].expand(8, 32))


@pytest.mark.parametrize(
    "style, group_size",
    [
        ("config.json", 32),  # AutoAWQ's to_transformers_dict, as TheBloke's config.json has it
        ("autoawq", 64),  # AutoAWQ's quant_config.json only, as its first uploads have it
        ("transformers", -1),  # transformers' own AwqConfig: version and format "gemm"
    ],
)
def test_every_awq_weight_is_kept_exactly(tmp_path, tiny_model_dir, monkeypatch, style, group_size):
    """In float32 each weight is the exact scale * (q - zero); rounded to fp16 it is AutoAWQ's own
    dequantized weight bit for bit (AutoAWQ computes in fp16, one rounding). Unpacked a few rows
    at a time, as a 180B layer is on the GPU."""
    monkeypatch.setattr(awq, "_LEVELS_PER_STEP", 1024)
    folder = tmp_path / "awq"
    raw = write_awq(folder, tiny_model_dir, style=style, group_size=group_size, shards=1)
    model = load_int4(folder)
    shapes = {name: tuple(values[4].shape) for name, values in raw.items()}
    for index in range(model.config.num_hidden_layers):
        for name, weight in split_layer(model, index, shapes).items():
            qweight, qzeros, scales, group, _, _ = raw[name]
            assert torch.equal(weight, exact_weight(raw[name])), name
            assert torch.equal(weight.half(), _autoawq_dequantize(qweight, qzeros, scales, group).t()), name
    assert model.products["h.0.out"].scale.dtype == torch.float16
    assert model.quantization.method == "AWQ"  # and its act scales, all 1, were dropped


def test_awq_fast_path_greedy_equals_generate_over_the_same_weights(
    tiny_model_dir, tiny_tokenizer, awq_dir, awq_model
):
    weights = {name: exact_weight(values) for name, values in awq_dir[1].items()}
    assert_greedy_equals_generate(tiny_model_dir, tiny_tokenizer, awq_model, weights)


def test_quantize_int4_serves_an_awq_checkpoint_end_to_end(awq_dir, tmp_path):
    assert_serves_and_saves(awq_dir[0], tmp_path / "saved")


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(version="gemv"), "AWQ version 'gemv': only 'gemm'"),
        (dict(version="marlin"), "AWQ version 'marlin'"),
        (dict(style="autoawq", version="exllama"), "AWQ version 'exllama'"),
        (dict(style="transformers", backend="llm-awq"), "AWQ version 'llm-awq'"),
        (dict(style="autoawq", w_bit=8), "AWQ with 8 bits: only 4-bit"),
        (dict(group_size=16), "AWQ group size 16"),
        (dict(zero_point=False), "zero_point false"),
        (dict(act_scales=0.5), r"mlp\.act\.scales: .* scales Falcon's MLP activation"),
        (dict(quant_method="compressed-tensors"), "quantized with 'compressed-tensors'; .* GPTQ or AWQ"),
    ],
)
def test_what_does_not_map_without_loss_is_a_clear_start_up_error(tmp_path, tiny_model_dir, options, message):
    folder = tmp_path / "awq"
    write_awq(folder, tiny_model_dir, shards=1, **options)
    with pytest.raises(ConfigError, match=f"--quantize int4: .*{message}"):
        build_backend(Settings(model=str(folder), quantize="int4"))


def test_an_awq_checkpoint_loads_on_one_gpu_only(awq_dir):
    with pytest.raises(ConfigError, match="AWQ checkpoint on one GPU: use --tensor-parallel 1"):
        build_backend(Settings(model=str(awq_dir[0]), quantize="int4", tensor_parallel=2))
