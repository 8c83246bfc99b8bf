"""Weight-only int4 on the CPU: the format's bounds, the fast decoder over int4 weights against
the int4 reference path, quantize-while-loading, save and reload, and `--quantize int4` end to end.

The GPU kernels (tinygemm, our Triton GEMV) are checked against the same float32 reference and
timed by bench/int4_kernels.py and bench/int4_decode.py; quality on real weights by
bench/int4_quality.py (docs/performance.md).
"""

from __future__ import annotations

import pytest
import torch

from chat.config import Settings, load_settings
from chat.conversation.errors import ConfigError
from chat.conversation.params import GenerationParams
from chat.engine.decode_loop import FastDecoder
from chat.engine.int4 import weight as int4
from chat.engine.int4.saved import Int4Writer, is_saved
from chat.factory import build_backend
from tests.quantized_checkpoints import load_int4

GREEDY = GenerationParams(temperature=0.0, max_new_tokens=24)
PROMPT = "User: Plan a trip to Lisbon\nFalcon:"


def _weights(rows=48, cols=512, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator) * 0.02
    weight[3, 7] = 0.3  # an outlier, as trained weights have
    return weight


@pytest.mark.parametrize("group_size", [128, 64, 32])
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_to_nearest_error_is_at_most_half_a_step(group_size, symmetric):
    weight = _weights()
    q = int4.quantize(weight, group_size, symmetric=symmetric, search="none")
    error = (int4.dequantize(q) - weight).abs().view(weight.shape[0], -1, group_size)
    half_step = q.scale.float()[..., None] / 2
    if symmetric:  # +max maps to level 7.5, rounded: the top may clip by up to half a step more
        half_step = half_step * 2
    assert bool((error <= half_step + 1e-6).all())


@pytest.mark.parametrize("search", ["clip", "hqq"])
def test_scale_search_never_has_more_squared_error_than_plain_rounding(search):
    weight = _weights(seed=1)
    plain = (int4.dequantize(int4.quantize(weight, 64, search="none")) - weight).square().sum()
    searched = (int4.dequantize(int4.quantize(weight, 64, search=search)) - weight).square().sum()
    assert searched <= plain
    assert searched / weight.square().sum() < 0.01  # int4's relative error on Gaussian weights: ~0.1 rms


def test_levels_pack_two_to_a_byte_and_back():
    q = torch.randint(0, 16, (6, 32), dtype=torch.uint8)
    packed = int4.pack(q)
    assert packed.shape == (6, 16) and packed.dtype == torch.uint8
    assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)  # even column in the low nibble
    assert torch.equal(int4.unpack(packed), q)


def test_group_size_is_the_largest_allowed_that_divides_the_row():
    assert int4.group_size_for(14848) == 128  # Falcon-180B's hidden size
    assert int4.group_size_for(4544) == 64  # Falcon-7B's
    with pytest.raises(ValueError):
        int4.group_size_for(100)


def test_reference_product_is_the_product_with_the_dequantized_weight():
    q = int4.quantize(_weights(), 64)
    x = torch.randn(3, 512)
    assert torch.allclose(int4.reference_linear(x, q), x @ int4.dequantize(q).T, atol=1e-6)


@pytest.fixture(scope="module")
def quantized_tiny(tiny_model_dir):
    return load_int4(tiny_model_dir)


def _ids(tokenizer, text=PROMPT):
    return torch.tensor([tokenizer(text)["input_ids"]])


def _generate(decoder, ids, params=GREEDY):
    tokens = []
    decoder.generate(ids, params, 0, tokens.append, lambda: False)
    return tokens


def _fast(model, tokenizer):
    return FastDecoder.from_layout(model.layout, tokenizer.eos_token_id)


def test_int4_fast_path_greedy_equals_the_int4_reference_in_float32(
    tiny_model_dir, tiny_tokenizer, quantized_tiny
):
    """The fast decoder's fused int4 products against transformers' own Falcon and `generate`,
    its linear layers holding the same int4 weights dequantized to float32."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    products = quantized_tiny.products
    for i, block in enumerate(reference.transformer.h):
        attn, mlp = block.self_attention, block.mlp
        fused_in = int4.dequantize(products[f"h.{i}.in"])
        rows = attn.query_key_value.weight.shape[0]
        attn.query_key_value.weight.data, mlp.dense_h_to_4h.weight.data = fused_in[:rows], fused_in[rows:]
        fused_out = int4.dequantize(products[f"h.{i}.out"])
        columns = attn.dense.weight.shape[1]
        attn.dense.weight.data, mlp.dense_4h_to_h.weight.data = fused_out[:, :columns], fused_out[:, columns:]
    reference.lm_head.weight = torch.nn.Parameter(int4.dequantize(products["lm_head"]), requires_grad=False)
    ids = _ids(tiny_tokenizer)
    with torch.inference_mode():
        out = reference.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=GREEDY.max_new_tokens,
            do_sample=False,
            pad_token_id=tiny_tokenizer.eos_token_id,
        )
    expected = out[0, ids.shape[1] :].tolist()
    tokens = _generate(_fast(quantized_tiny, tiny_tokenizer), ids)
    assert tokens == expected[: len(tokens)] and len(tokens) >= 8


def test_quantize_while_loading_keeps_norms_and_embeddings_dense(quantized_tiny):
    config = quantized_tiny.config
    assert set(quantized_tiny.products) == {
        f"h.{i}.{p}" for i in range(config.num_hidden_layers) for p in ("in", "out")
    } | {"lm_head"}
    embed = quantized_tiny.layout.embed
    assert embed.dtype == torch.float32 and embed.shape == (config.vocab_size, config.hidden_size)
    assert quantized_tiny.products["lm_head"].shape == (config.vocab_size, config.hidden_size)


def test_saved_int4_reloads_to_the_same_tokens(tmp_path, tiny_model_dir, tiny_tokenizer, quantized_tiny):
    load_int4(tiny_model_dir, save=Int4Writer(tmp_path / "int4"))
    assert is_saved(tmp_path / "int4") and (tmp_path / "int4" / "tokenizer.json").exists()
    reloaded = load_int4(tmp_path / "int4")
    assert reloaded.quantization.method == "saved int4"
    with pytest.raises(ConfigError, match="a saved int4 checkpoint on one GPU"):
        build_backend(Settings(model=str(tmp_path / "int4"), quantize="int4", tensor_parallel=2))
    for name, weight in quantized_tiny.products.items():
        assert torch.equal(reloaded.products[name].packed, weight.packed)
    ids = _ids(tiny_tokenizer)
    assert _generate(_fast(reloaded, tiny_tokenizer), ids) == _generate(
        _fast(quantized_tiny, tiny_tokenizer), ids
    )


def test_quantize_int4_serves_the_tiny_model_end_to_end(tmp_path, tiny_model_dir):
    saved = tmp_path / "saved"
    backend = build_backend(Settings(model=str(tiny_model_dir), quantize="int4", save_quantized=str(saved)))
    try:
        assert "int4" in backend.name
        tokens = list(backend.stream(PROMPT, GenerationParams(temperature=0.0, max_new_tokens=12)))
        assert tokens[-1].finish_reason in ("length", "stop")
        assert "".join(t.text for t in tokens).strip()
    finally:
        backend.close()
    reloaded = build_backend(Settings(model=str(saved), quantize="int4"))
    try:
        again = list(reloaded.stream(PROMPT, GenerationParams(temperature=0.0, max_new_tokens=12)))
        assert [t.id for t in again] == [t.id for t in tokens]
    finally:
        reloaded.close()


def test_int4_flags_are_checked():
    assert (
        load_settings(["--quantize", "int4", "--save-quantized", "/tmp/x"], environ={}).save_quantized
        == "/tmp/x"
    )
    with pytest.raises(ConfigError, match="--save-quantized needs --quantize int4"):
        load_settings(["--save-quantized", "/tmp/x"], environ={})


def test_int4_of_a_model_the_fast_decoder_cannot_run_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "falcon", "alibi": true, "parallel_attn": true}')
    with pytest.raises(ConfigError, match="--quantize int4: ALiBi"):
        build_backend(Settings(model=str(tmp_path), quantize="int4"))


@pytest.mark.parametrize("tiles", [2, 4, 8])
def test_tile_order_found_by_probes_reads_back_every_level(tiles):
    from chat.engine.int4.tinygemm_tiles import TileOrder, dense_weight, swap_nibbles
    from tests.helpers import fake_tinygemm_pack

    weight = int4.quantize(_weights(rows=32, cols=512), 64)
    levels = int4.unpack(weight.packed)
    tiled = fake_tinygemm_pack(swap_nibbles(levels), tiles)
    order = TileOrder(tiles, "cpu", pack=fake_tinygemm_pack)
    assert order.check(tiled, levels)
    assert not order.check(tiled, levels.roll(1, dims=1))
    scale, zero = weight.scale.float(), weight.offset.float() + 8 * weight.scale.float()
    scale_zero = torch.stack((scale, zero), dim=-1).transpose(0, 1)
    assert torch.allclose(
        dense_weight(tiled, scale_zero, order, torch.float32), int4.dequantize(weight), atol=1e-6
    )


def test_a_checkpoint_in_shards_quantizes_to_the_same_weights(tmp_path, tiny_model_dir, quantized_tiny):
    """Layers split across shards (as Falcon-180B's 4 GB shards split them) are fused and
    quantized once their last weight arrives, whatever the shard order."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    sharded = load_int4(tmp_path)
    assert sharded.products.keys() == quantized_tiny.products.keys()
    for name, weight in quantized_tiny.products.items():
        assert torch.equal(sharded.products[name].packed, weight.packed), name
