"""The fast decoder's logic, run eagerly on the CPU in float32 against transformers' own generate.

The GPU-only parts (compiling, CUDA-graph capture and replay) are measured by bench/gpu_decode.py,
which also checks greedy agreement in bfloat16 there.
"""

from __future__ import annotations

import pytest
import torch

from chat.backends.local.backend import LocalBackend
from chat.config import Settings
from chat.conversation.backend import FINISH_CANCELLED, FINISH_LENGTH
from chat.conversation.params import GenerationParams
from chat.engine.build import Engine, choose_decoder
from chat.engine.decode_loop import FastDecoder
from chat.engine.decoders import PlainDecoder
from chat.engine.layout import Unsupported
from chat.engine.sampling import penalize, sampling_probs
from chat.factory import build_backend
from tests.helpers import decode as run

CACHE = 128  # tokens; small, so eager attention over the whole cache stays quick
GREEDY = GenerationParams(temperature=0.0, max_new_tokens=24)
SAMPLED = GenerationParams(temperature=0.9, top_p=0.9, top_k=40, repetition_penalty=1.1, max_new_tokens=20)


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def plain(tiny_model_dir, tiny_tokenizer):
    return PlainDecoder(_load(tiny_model_dir), tiny_tokenizer)


@pytest.fixture(scope="module")
def fast_model(tiny_model_dir):
    """The model the `fast` decoder was laid out from (its modules now view the fused weights)."""
    return _load(tiny_model_dir)


@pytest.fixture(scope="module")
def fast(fast_model, tiny_tokenizer):
    return FastDecoder(fast_model, tiny_tokenizer, max_len=CACHE)


def _ids(tokenizer, text):
    return torch.tensor([tokenizer(text)["input_ids"]])


PROMPTS = ["User: Plan a trip to Lisbon\nFalcon:", "System: Be brief.\nUser: Write a haiku\nFalcon:"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_are_those_of_plain_generate(plain, fast, tiny_tokenizer, prompt):
    ids = _ids(tiny_tokenizer, prompt)
    assert run(fast, ids, GREEDY) == run(plain, ids, GREEDY)


def test_greedy_with_repetition_penalty_is_that_of_plain_generate(plain, fast, tiny_tokenizer):
    ids = _ids(tiny_tokenizer, PROMPTS[0])
    params = GenerationParams(temperature=0.0, repetition_penalty=1.5, max_new_tokens=24)
    penalized, _ = run(fast, ids, params)
    assert penalized == run(plain, ids, params)[0]
    assert penalized != run(fast, ids, GREEDY)[0]


@pytest.mark.parametrize(
    "config",
    [
        dict(new_decoder_architecture=True, num_kv_heads=2, num_attention_heads=8),  # 40B/180B layout
        dict(new_decoder_architecture=True, num_kv_heads=2, num_attention_heads=8, num_ln_in_parallel_attn=1),
        dict(multi_query=False, num_attention_heads=4),  # one KV head per query head
        dict(multi_query=True, num_attention_heads=4, bias=True),
    ],
    ids=["new-architecture", "new-architecture-one-norm", "multi-head", "multi-query-bias"],
)
def test_every_rotary_falcon_layout_decodes_as_plain_generate(tiny_tokenizer, config):
    from transformers import FalconConfig, FalconForCausalLM

    settings = dict(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        parallel_attn=True,
        alibi=False,
        bias=False,
        initializer_range=0.5,
    )
    torch.manual_seed(1)
    reference = FalconForCausalLM(FalconConfig(**{**settings, **config})).eval()
    copy = FalconForCausalLM(reference.config).eval()
    copy.load_state_dict(reference.state_dict())
    ids = _ids(tiny_tokenizer, PROMPTS[1])
    expected = run(PlainDecoder(reference, tiny_tokenizer), ids, GREEDY)
    assert run(FastDecoder(copy, tiny_tokenizer, max_len=CACHE), ids, GREEDY) == expected


def test_plain_generate_still_works_on_the_fused_weights(tiny_tokenizer, plain, fast, fast_model):
    ids = _ids(tiny_tokenizer, PROMPTS[0])
    short = GREEDY.with_max_new_tokens(8)
    assert run(PlainDecoder(fast_model, tiny_tokenizer), ids, short) == run(plain, ids, short)


def test_stop_ends_generation_within_one_token(fast, tiny_tokenizer):
    tokens, reason = run(fast, _ids(tiny_tokenizer, PROMPTS[0]), GREEDY, stop_after=3)
    assert (len(tokens), reason) == (3, FINISH_CANCELLED)


def test_max_new_tokens_and_the_end_of_the_cache_end_with_length(tiny_model_dir, tiny_tokenizer, fast):
    ids = _ids(tiny_tokenizer, PROMPTS[0])
    tokens, reason = run(fast, ids, GenerationParams(temperature=0.0, max_new_tokens=5))
    assert (len(tokens), reason) == (5, FINISH_LENGTH)
    short = FastDecoder(_load(tiny_model_dir), tiny_tokenizer, max_len=ids.shape[-1] + 4)
    tokens, reason = run(short, ids, GREEDY)
    assert (len(tokens), reason) == (4, FINISH_LENGTH)


def test_a_prompt_longer_than_the_cache_is_refused(tiny_model_dir, tiny_tokenizer):
    short = FastDecoder(_load(tiny_model_dir), tiny_tokenizer, max_len=4)
    with pytest.raises(ValueError, match="does not fit"):
        run(short, _ids(tiny_tokenizer, PROMPTS[0]), GREEDY)


def test_sampling_is_reproducible_by_seed(fast, tiny_tokenizer):
    ids = _ids(tiny_tokenizer, PROMPTS[0])
    first = run(fast, ids, SAMPLED, seed=7)
    assert run(fast, ids, SAMPLED, seed=7) == first
    assert run(fast, ids, SAMPLED, seed=8) != first


def test_top_k_one_and_a_tiny_top_p_are_greedy(fast, tiny_tokenizer):
    ids = _ids(tiny_tokenizer, PROMPTS[1])
    greedy = run(fast, ids, GREEDY)
    assert run(fast, ids, GenerationParams(temperature=1.5, top_k=1, max_new_tokens=24), seed=3) == greedy
    assert run(fast, ids, GenerationParams(temperature=1.5, top_p=1e-6, max_new_tokens=24), seed=3) == greedy


@pytest.mark.parametrize(
    "params",
    [
        GenerationParams(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.3),
        GenerationParams(temperature=1.3, top_p=1.0, top_k=0, repetition_penalty=1.0),
        GenerationParams(temperature=0.5, top_p=0.5, top_k=0, repetition_penalty=2.0),
        GenerationParams(temperature=1.0, top_p=1.0, top_k=3, repetition_penalty=1.0),
    ],
)
def test_sampling_distribution_is_that_of_transformers_processors(params):
    from transformers import GenerationConfig
    from transformers.generation.utils import GenerationMixin

    torch.manual_seed(0)
    vocab = 1000
    logits = torch.randn(vocab)  # flat enough that top-p cuts between many near-equal tokens
    history = torch.randint(0, vocab, (1, 30))
    config = GenerationConfig(
        do_sample=True,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        repetition_penalty=params.repetition_penalty,
    )
    processors = _processors(GenerationMixin, config)
    expected = processors(history, logits[None].clone())[0].softmax(-1)

    seen = torch.zeros(vocab, dtype=torch.bool)
    seen[history[0]] = True
    penalized = torch.where(seen, penalize(logits, torch.tensor([params.repetition_penalty])), logits)
    top_k = params.top_k if params.top_k else vocab
    knobs = (
        None,
        torch.tensor([params.temperature]),
        torch.tensor([top_k - 1]),
        torch.tensor([params.top_p]),
    )
    not_last = torch.ones(vocab, dtype=torch.bool)
    not_last[-1] = False
    got = sampling_probs(penalized, knobs, not_last)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert (got > 0).sum() == (expected > 0).sum()


def _processors(mixin, config):
    """transformers' own processor list for `config`, built the way generate builds it."""
    from types import SimpleNamespace

    owner = SimpleNamespace(
        config=SimpleNamespace(is_encoder_decoder=False),
        _merge_criteria_processor_list=(lambda default, custom: default),
    )
    config._eos_token_tensor = None
    return mixin._get_logits_processor(owner, config, input_ids_seq_length=30, device="cpu")


def test_local_backend_streams_and_cancels_through_the_fast_decoder(tiny_tokenizer, fast, fast_model):
    backend = LocalBackend(
        Engine.of_model(fast_model, tiny_tokenizer, context_length=CACHE, decoder=fast), model_name="tiny"
    )
    try:
        params = GenerationParams(temperature=0.0, max_new_tokens=30, stop_sequences=("\nUser:",))
        tokens = list(backend.stream(PROMPTS[0], params))
        assert tokens[-1].finish_reason in ("length", "stop")
        stream = backend.stream(PROMPTS[0], GenerationParams(temperature=0.0, max_new_tokens=1000))
        next(stream)
        stream.close()  # what Gradio's Stop does; the worker must be free for the next request
        again = list(backend.stream(PROMPTS[0], params))
        assert [t.id for t in again] == [t.id for t in tokens]
    finally:
        backend.close()


def test_decoder_choice(tiny_model_dir, tiny_tokenizer):
    model = _load(tiny_model_dir)
    assert isinstance(choose_decoder("auto", model, tiny_tokenizer, CACHE), PlainDecoder)  # CPU
    assert isinstance(choose_decoder("plain", model, tiny_tokenizer, CACHE), PlainDecoder)
    assert isinstance(choose_decoder("fast", model, tiny_tokenizer, CACHE), FastDecoder)
    backend = build_backend(Settings(model=str(tiny_model_dir), decoder="fast"))
    try:
        assert isinstance(backend.decoder, FastDecoder)
    finally:
        backend.close()


def test_a_fast_decoder_that_cannot_start_falls_back_to_plain_generate(tiny_model_dir, tiny_tokenizer, plain):
    model = _load(tiny_model_dir)
    # Capturing CUDA graphs on a machine without CUDA fails as a failed compile or capture would.
    doomed = FastDecoder(model, tiny_tokenizer, max_len=CACHE, use_graphs=True, compile_mode="off")
    backend = LocalBackend(
        Engine.of_model(model, tiny_tokenizer, context_length=CACHE, decoder=doomed), model_name="tiny"
    )
    try:
        assert isinstance(backend.decoder, PlainDecoder)
        tokens = [t.id for t in backend.stream(PROMPTS[0], GREEDY) if t.id is not None]
        assert tokens == run(plain, _ids(tiny_tokenizer, PROMPTS[0]), GREEDY)[0]
    finally:
        backend.close()


def test_alibi_falcon_is_left_to_plain_generate(tiny_tokenizer):
    from transformers import FalconConfig, FalconForCausalLM

    from chat.conversation.errors import ConfigError

    model = FalconForCausalLM(
        FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, alibi=True)
    )
    with pytest.raises(Unsupported, match="ALiBi"):
        FastDecoder(model, tiny_tokenizer, max_len=CACHE)
    assert isinstance(choose_decoder("auto", model, tiny_tokenizer, CACHE), PlainDecoder)
    with pytest.raises(ConfigError, match="ALiBi"):
        choose_decoder("fast", model, tiny_tokenizer, CACHE)


def test_decoder_is_chosen_by_flag_or_environment():
    from chat.config import load_settings
    from chat.conversation.errors import ConfigError

    assert load_settings([], environ={}).decoder == "auto"
    assert load_settings([], environ={"DECODER": "plain"}).decoder == "plain"
    assert load_settings(["--decoder", "fast"], environ={"DECODER": "plain"}).decoder == "fast"
    with pytest.raises(ConfigError, match="--decoder must be one of auto, plain, fast"):
        load_settings(["--decoder", "turbo"], environ={})
