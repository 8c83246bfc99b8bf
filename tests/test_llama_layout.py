"""The fast decoder on the Llama layout (Falcon3, SmolLM2, Llama 3): tiny random Llamas on the CPU in
float32 against transformers' own `generate`, over every difference families.py names.

Grouped-query attention with group counts 1 to 4, tied and untied heads, biases, the rope types
whose tables are static, a clear refusal of the others; `--quantize int4` (quantize while loading,
save, reload) through the app's own factory; tensor parallelism by the same plan as Falcon's.
Real trained weights (SmolLM2-135M-Instruct) are tests/test_real_model.py's.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from chat.config import Settings
from chat.conversation.errors import ConfigError
from chat.conversation.params import GenerationParams
from chat.engine.decode_loop import FastDecoder
from chat.engine.decoders import PlainDecoder
from chat.engine.layout import Unsupported
from chat.factory import build_backend

CACHE = 128
GREEDY = GenerationParams(temperature=0.0, max_new_tokens=24)
PROMPT = "User: Plan a trip to Lisbon\nFalcon:"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tiny_llama(vocab: int, **overrides):
    """A random LlamaForCausalLM of Falcon3's proportions (GQA group 3, untied head), float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=vocab,
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=1000042.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=0.3,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(3)
    return LlamaForCausalLM(LlamaConfig(**{**settings, **overrides})).eval()


def save_with_tokenizer(model, folder, tiny_model_dir):
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tiny_model_dir / name).exists():
            shutil.copy(tiny_model_dir / name, folder / name)
    return folder


def _ids(tokenizer, text=PROMPT):
    return torch.tensor([tokenizer(text)["input_ids"]])


def run(decoder, ids, params=GREEDY, seed=0):
    tokens = []
    decoder.generate(ids, params, seed, tokens.append, lambda: False)
    return tokens


def _copy(model):
    twin = type(model)(model.config).eval()
    twin.load_state_dict(model.state_dict())
    return twin


LAYOUTS = {
    "gqa-3": {},  # Falcon3's 12 query heads over 4 KV heads, scaled down
    "multi-head": dict(num_key_value_heads=6),  # group 1
    "multi-query": dict(num_key_value_heads=1),  # group 6: one KV head
    "gqa-2-tied": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True),
    "biases": dict(attention_bias=True, mlp_bias=True),
    "rope-linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "rope-llama3": dict(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    ),
    "rope-yarn": dict(
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}
    ),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_greedy_tokens_are_those_of_plain_generate(tiny_tokenizer, layout):
    reference = tiny_llama(len(tiny_tokenizer), **LAYOUTS[layout])
    ids = _ids(tiny_tokenizer)
    expected = run(PlainDecoder(reference, tiny_tokenizer), ids)
    assert len(set(expected)) > 3  # weights that say something, not one token repeated
    assert run(FastDecoder(_copy(reference), tiny_tokenizer, max_len=CACHE), ids) == expected


def test_plain_generate_still_works_beside_the_fast_layout(tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer))
    ids = _ids(tiny_tokenizer)
    before = run(PlainDecoder(model, tiny_tokenizer), ids)
    fast = FastDecoder(model, tiny_tokenizer, max_len=CACHE)  # its MLP rows view the fused weights
    assert run(PlainDecoder(model, tiny_tokenizer), ids) == before == run(fast, ids)


def test_seeded_sampling_repeats_and_penalties_apply(tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer))
    fast = FastDecoder(model, tiny_tokenizer, max_len=CACHE)
    ids = _ids(tiny_tokenizer)
    sampled = GenerationParams(
        temperature=0.9, top_p=0.9, top_k=40, repetition_penalty=1.1, max_new_tokens=20
    )
    assert run(fast, ids, sampled, seed=7) == run(fast, ids, sampled, seed=7)
    assert run(fast, ids, sampled, seed=7) != run(fast, ids, sampled, seed=8)
    penalized = GenerationParams(temperature=0.0, repetition_penalty=1.5, max_new_tokens=24)
    assert run(fast, ids, penalized) == run(PlainDecoder(_copy(model), tiny_tokenizer), ids, penalized)


@pytest.mark.parametrize("rope", ["dynamic", "longrope"])
def test_rope_that_changes_with_the_length_is_refused_naming_the_field(
    tmp_path, tiny_model_dir, tiny_tokenizer, rope
):
    scaling = {"rope_type": rope, "factor": 2.0}
    if rope == "longrope":
        scaling.update(short_factor=[1.0] * 8, long_factor=[2.0] * 8, original_max_position_embeddings=512)
    model = tiny_llama(len(tiny_tokenizer), rope_scaling=scaling)
    with pytest.raises(Unsupported, match=f"rope scaling '{rope}' \\(config.json's rope_scaling\\)"):
        FastDecoder(model, tiny_tokenizer, max_len=CACHE)
    folder = save_with_tokenizer(model, tmp_path, tiny_model_dir)
    with pytest.raises(ConfigError, match=f"--decoder fast: rope scaling '{rope}'"):
        build_backend(Settings(model=str(folder), decoder="fast"))
    with pytest.raises(ConfigError, match=f"--quantize int4: rope scaling '{rope}'"):
        build_backend(Settings(model=str(folder), quantize="int4"))


def test_the_app_serves_a_llama_folder_with_the_fast_decoder(tmp_path, tiny_model_dir, tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer))
    folder = save_with_tokenizer(model, tmp_path, tiny_model_dir)
    backend = build_backend(Settings(model=str(folder), decoder="fast", max_total_tokens=CACHE))
    try:
        assert isinstance(backend.decoder, FastDecoder) and backend.decoder.layout.family == "llama"
        streamed = [t.id for t in backend.stream(PROMPT, GREEDY) if t.id is not None]
        assert streamed == run(PlainDecoder(model, tiny_tokenizer), _ids(tiny_tokenizer))
    finally:
        backend.close()


# -- int4 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_int4_fast_path_greedy_equals_generate_over_the_same_int4_weights(
    tmp_path, tiny_model_dir, tiny_tokenizer, tied
):
    from tests.quantized_checkpoints import hold_int4_layout, load_int4

    model = tiny_llama(
        len(tiny_tokenizer), hidden_size=128, head_dim=32, num_attention_heads=4, tie_word_embeddings=tied
    )
    folder = save_with_tokenizer(model, tmp_path, tiny_model_dir)
    quantized = load_int4(folder)
    qkv = quantized.products["h.0.in"]
    assert qkv.shape == (2 * (2 + 2) * 32, 128) and qkv.group_size == 128
    reference = _copy(model)
    hold_int4_layout(reference, quantized.layout)
    ids = _ids(tiny_tokenizer)
    expected = run(PlainDecoder(reference, tiny_tokenizer), ids)
    assert run(FastDecoder.from_layout(quantized.layout, tiny_tokenizer.eos_token_id), ids) == expected


def test_quantize_int4_and_save_serve_a_llama_end_to_end(tmp_path, tiny_model_dir, tiny_tokenizer):
    folder = save_with_tokenizer(
        tiny_llama(len(tiny_tokenizer), tie_word_embeddings=True), tmp_path / "bf16", tiny_model_dir
    )
    saved = tmp_path / "int4"
    params = GenerationParams(temperature=0.0, max_new_tokens=12)
    backend = build_backend(Settings(model=str(folder), quantize="int4", save_quantized=str(saved)))
    try:
        assert "int4" in backend.name and backend.decoder.layout.family == "llama"
        tokens = [t.id for t in backend.stream(PROMPT, params)]
    finally:
        backend.close()
    reloaded = build_backend(Settings(model=str(saved), quantize="int4"))
    try:
        assert [t.id for t in reloaded.stream(PROMPT, params)] == tokens
    finally:
        reloaded.close()


# -- tensor parallelism ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout, world", [("gqa-3", 2), ("gqa-3", 3), ("multi-query", 2), ("biases", 2)])
def test_every_rank_generates_what_one_device_does_with_two_sums_per_layer(
    tmp_path, tiny_model_dir, tiny_tokenizer, layout, world
):
    """The same plan as Falcon's (parallel/shards.py): KV groups or queries shared out, the MLP by
    rows; attention and the MLP each end in one sum (Falcon's parallel layer needs one)."""
    from tests.test_tensor_parallel import _sharded_greedy

    model = tiny_llama(len(tiny_tokenizer), **LAYOUTS[layout])
    folder = save_with_tokenizer(model, tmp_path, tiny_model_dir)
    ids = _ids(tiny_tokenizer)
    expected = run(PlainDecoder(model, tiny_tokenizer), ids)
    per_rank, sums = _sharded_greedy(folder, tiny_tokenizer, ids, world, len(expected))
    assert per_rank == [expected] * world
    assert sums == 2 * model.config.num_hidden_layers * len(expected)


def test_two_rank_processes_serve_a_llama_as_one_does(tmp_path, tiny_model_dir, tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer))
    folder = save_with_tokenizer(model, tmp_path, tiny_model_dir)
    backend = build_backend(Settings(model=str(folder), tensor_parallel=2, max_total_tokens=CACHE))
    try:
        assert "tensor parallel" in backend.name
        streamed = [t.id for t in backend.stream(PROMPT, GREEDY) if t.id is not None]
        assert streamed == run(PlainDecoder(model, tiny_tokenizer), _ids(tiny_tokenizer))
    finally:
        backend.close()
