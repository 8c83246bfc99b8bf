"""The local transformers backend on the tiny Falcon: real generation, Stop, and failures."""

from __future__ import annotations

import pytest
import torch

from chat.backends.local.backend import LocalBackend
from chat.conversation.backend import FINISH_CANCELLED, FINISH_LENGTH
from chat.conversation.errors import GenerationFailed
from chat.conversation.params import GenerationParams
from chat.engine.build import Engine, load_model
from chat.engine.decoders import PlainDecoder
from tests.doubles import RecordingDecoder

GREEDY = GenerationParams(temperature=0, max_new_tokens=24)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return load_model(str(tiny_model_dir))


@pytest.fixture
def recording_backend(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    decoder = RecordingDecoder(PlainDecoder(model, tokenizer), tokenizer)
    backend = LocalBackend(
        Engine.of_model(model, tokenizer, context_length=2048, decoder=decoder), model_name="tiny"
    )
    yield backend, decoder
    backend.close()


def test_streams_the_same_greedy_text_as_plain_generate(local_backend, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = "User: Write a haiku about the sea.\nFalcon:"
    tokens = list(local_backend.stream(prompt, GREEDY))
    assert len(tokens) == GREEDY.max_new_tokens + 1  # one per token, then the end
    assert tokens[-1].finish_reason == FINISH_LENGTH

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        expected_ids = model.generate(
            ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    expected = tokenizer.decode(expected_ids[0, ids.shape[1] :], skip_special_tokens=True)
    assert [t.id for t in tokens[:-1]] == expected_ids[0, ids.shape[1] :].tolist()
    assert "".join(t.text for t in tokens) == expected


def test_counts_tokens_with_the_models_tokenizer(local_backend, tiny_tokenizer):
    text = "User: hello there\nFalcon:"
    assert local_backend.count_tokens(text) == len(tiny_tokenizer(text)["input_ids"])
    assert local_backend.context_length() == 2048


def test_same_seed_same_sample_and_the_seed_is_reported(local_backend):
    params = GenerationParams(temperature=1.0, top_p=0.95, max_new_tokens=30, seed=1234)
    first = list(local_backend.stream("User: hi\nFalcon:", params))
    second = list(local_backend.stream("User: hi\nFalcon:", params))
    assert [t.id for t in first] == [t.id for t in second]
    assert first[-1].seed == 1234


def test_closing_the_stream_stops_generation_within_one_token(recording_backend):
    backend, decoder = recording_backend
    decoder.tokens_per_s = 200  # a real model's pace: the tiny one could finish before the close
    # Greedy, a prompt whose reply runs the full length (no end-of-text token to end it early).
    stream = backend.stream(
        "User: Please keep talking.\nFalcon:", GenerationParams(temperature=0, max_new_tokens=2000)
    )
    for _ in range(3):
        next(stream)
    stream.close()
    generation = decoder.ended_generation(0)
    assert generation.finish_reason == FINISH_CANCELLED
    assert generation.tokens < 2000
    assert generation.tokens_after_cancel <= 1


def test_model_is_free_for_the_next_request_after_a_stop(recording_backend):
    backend, _ = recording_backend
    stream = backend.stream("User: a\nFalcon:", GenerationParams(temperature=1.0, max_new_tokens=2000))
    next(stream)
    stream.close()
    tokens = list(backend.stream("User: b\nFalcon:", GREEDY))
    assert tokens[-1].finish_reason == FINISH_LENGTH


def test_an_exception_inside_the_model_reaches_the_reader_as_a_clear_error(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    backend = LocalBackend(Engine.of_model(model, tokenizer, context_length=2048), model_name="tiny")
    calls = {"n": 0}

    def explode_on_fifth_step(module, args, output):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    hook = model.transformer.h[0].register_forward_hook(explode_on_fifth_step)
    try:
        stream = backend.stream("User: hi\nFalcon:", GREEDY)
        received = []
        with pytest.raises(GenerationFailed) as raised:
            for token in stream:
                received.append(token)
        assert len(received) == 4  # the tokens made before the failure still arrived
        assert "illegal memory" not in raised.value.user_message
    finally:
        hook.remove()
    # The worker survived: the next request is served.
    assert list(backend.stream("User: hi\nFalcon:", GREEDY))[-1].finish_reason == FINISH_LENGTH
    backend.close()
