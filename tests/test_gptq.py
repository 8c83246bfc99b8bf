"""GPTQ 4-bit checkpoints into int4 (chat/backends/gptq.py): every weight kept, the fast path's
tokens equal to transformers' over the same weights, and what cannot map refused clearly.

The checkpoints are the tiny offline Falcon quantized here (round to nearest, per group) and
written as AutoGPTQ writes them: `_autogptq_pack` follows AutoGPTQ's `QuantLinear.pack`
(auto_gptq/nn_modules/qlinear/qlinear_cuda.py) loop for loop, independently of the loader, with
the config in config.json's "quantization_config" as TheBloke's later uploads have it (or in
quantize_config.json, as the earlier ones). No real GPTQ checkpoint is on this machine.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from chat.backends import int4, int4_gemv
from chat.backends.falcon_int4 import layout_from_int4, load_int4
from chat.backends.fast_decode import FastDecoder
from chat.backends.int4_products import Int4Reference
from chat.config import Settings
from chat.errors import ConfigError
from chat.factory import build_backend
from chat.params import GenerationParams

LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
GREEDY = GenerationParams(temperature=0.0, max_new_tokens=24)
PROMPT = "User: Plan a trip to Lisbon\nFalcon:"


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


def write_gptq(folder, tiny_model_dir, *, checkpoint_format="gptq", sym=False, group_size=32,
               desc_act=False, permute=False, bits=4, shards=2, config_file="config.json") -> dict:  # fmt: skip
    """The tiny Falcon as a GPTQ checkpoint in `folder`; returns each linear layer's raw
    (q [out, in], zero [groups, out], scale [groups, out] fp16, group size)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    quantization = {"bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
                    "damp_percent": 0.1, "true_sequential": True, "static_groups": False}  # fmt: skip
    if checkpoint_format != "gptq":
        quantization["checkpoint_format"] = checkpoint_format
    if config_file == "config.json":
        config["quantization_config"] = {**quantization, "quant_method": "gptq"}
    else:
        (folder / config_file).write_text(json.dumps(quantization))
    config["dtype"] = "float16"
    (folder / "config.json").write_text(json.dumps(config))

    from safetensors import safe_open

    raw, tensors = {}, {}
    with safe_open(str(tiny_model_dir / "model.safetensors"), framework="pt") as dense:
        for name in dense.keys():  # noqa: SIM118
            weight = dense.get_tensor(name)
            module = name.removesuffix(".weight")
            if not module.endswith(LINEARS):
                tensors[name] = weight.half()
                continue
            out_features, in_features = weight.shape
            group = in_features if group_size == -1 else group_size
            q, zero, scale = _round_to_nearest(weight, group, sym)
            qweight, qzeros = _autogptq_pack(q, zero, checkpoint_format)
            g_idx = torch.arange(in_features, dtype=torch.int32) // group
            if permute:  # act order: g_idx follows the permuted order of the columns
                g_idx = g_idx[torch.randperm(in_features, generator=torch.Generator().manual_seed(0))]
            tensors.update({f"{module}.qweight": qweight, f"{module}.qzeros": qzeros,
                            f"{module}.scales": scale, f"{module}.g_idx": g_idx})  # fmt: skip
            raw[module] = (q, zero, scale, group)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return raw
    # Two shards, a layer split across them (as large checkpoints' shards split layers).
    first = {k: v for k, v in tensors.items() if k.startswith("transformer.h.0.")}
    first.pop("transformer.h.0.mlp.dense_4h_to_h.g_idx")
    weight_map = {}
    for i, part in enumerate((first, {k: v for k, v in tensors.items() if k not in first})):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(part, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return raw


def gptq_weight(raw) -> torch.Tensor:
    """GPTQ's own dequantization, straight from the raw values: scale * (q - zero), float32."""
    q, zero, scale, group = raw
    per_column = torch.arange(q.shape[1]) // group
    return scale.float().t()[:, per_column] * (q - zero.t()[:, per_column]).float()


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("gptq") / "tiny-gptq"
    return folder, write_gptq(folder, tiny_model_dir)


@pytest.fixture(scope="module")
def gptq_model(gptq_dir):
    return load_int4(gptq_dir[0], device="cpu", dtype=torch.float32)


def _split(model, index: int, raw_shapes: dict):
    """The four linear weights of layer `index` cut back out of the fused int4 products."""
    prefix = f"transformer.h.{index}."
    fused_in = int4.dequantize(model.products[f"h.{index}.in"])
    fused_out = int4.dequantize(model.products[f"h.{index}.out"])
    rows = raw_shapes[prefix + LINEARS[0]][0]
    columns = raw_shapes[prefix + LINEARS[1]][1]
    return {
        prefix + LINEARS[0]: fused_in[:rows],
        prefix + LINEARS[2]: fused_in[rows:],
        prefix + LINEARS[1]: fused_out[:, :columns],
        prefix + LINEARS[3]: fused_out[:, columns:],
    }


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
    raw = write_gptq(folder, tiny_model_dir, checkpoint_format=checkpoint_format, sym=sym,
                     group_size=group_size, desc_act=desc_act, shards=1)  # fmt: skip
    model = load_int4(folder, device="cpu", dtype=torch.float32)
    shapes = {name: tuple(values[0].shape) for name, values in raw.items()}
    for index in range(model.config.num_hidden_layers):
        for name, weight in _split(model, index, shapes).items():
            assert torch.equal(weight, gptq_weight(raw[name])), name
    for name in ("h.0.in", "h.0.out"):  # symmetric: -8 * scale is exact in fp16; else float32
        assert model.products[name].scale.dtype == torch.float16
        assert model.products[name].offset.dtype == (torch.float16 if sym else torch.float32)
    assert model.stats["source"].startswith("GPTQ")


def test_gptq_fast_path_greedy_equals_generate_over_the_same_weights(
    tiny_model_dir, tiny_tokenizer, gptq_dir, gptq_model
):
    """transformers' Falcon holding GPTQ's weights (scale * (q - zero), straight from the raw
    values), the checkpoint's fp16 norms and embeddings, and the int4 lm_head (GPTQ leaves it
    dense; we quantize it as from bf16), against the fast decoder on the loaded GPTQ model."""
    from transformers import AutoModelForCausalLM

    _, raw = gptq_dir
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.copy_(parameter.half().float())  # the checkpoint's dense tensors are fp16
        for name, values in raw.items():
            reference.get_submodule(name).weight.copy_(gptq_weight(values))
    lm_head = int4.dequantize(gptq_model.products["lm_head"])
    reference.lm_head.weight = torch.nn.Parameter(lm_head, requires_grad=False)
    ids = torch.tensor([tiny_tokenizer(PROMPT)["input_ids"]])
    with torch.inference_mode():
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY.max_new_tokens,
                                 do_sample=False, pad_token_id=tiny_tokenizer.eos_token_id)  # fmt: skip
    expected = out[0, ids.shape[1] :].tolist()
    fresh = type(gptq_model)(gptq_model.config, dict(gptq_model.products), dict(gptq_model.dense))
    layout = layout_from_int4(fresh, max_len=128, products=Int4Reference)
    tokens = []
    FastDecoder.from_layout(layout, tiny_tokenizer.eos_token_id).generate(
        ids, GREEDY, 0, tokens.append, lambda: False
    )
    assert tokens == expected[: len(tokens)] and len(tokens) >= 8


def test_quantize_int4_serves_a_gptq_checkpoint_end_to_end(gptq_dir, tmp_path):
    saved = tmp_path / "saved"
    backend = build_backend(Settings(model=str(gptq_dir[0]), quantize="int4", save_quantized=str(saved)))
    try:
        assert "int4" in backend.name
        tokens = list(backend.stream(PROMPT, GenerationParams(temperature=0.0, max_new_tokens=8)))
        assert "".join(t.text for t in tokens).strip()
    finally:
        backend.close()
    assert "quantization_config" not in json.loads((saved / "config.json").read_text())
    reloaded = load_int4(saved, device="cpu")
    assert reloaded.stats["source"] == "int4"


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
