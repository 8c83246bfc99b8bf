"""The whole app, served on loopback with the tiny local model, driven through gradio_client."""

from __future__ import annotations

import pytest
from gradio_client import Client

from chat.backends.local import LocalBackend, PlainDecoder, load_model
from chat.backends.base import FINISH_CANCELLED
from chat.config import Settings
from tests.conftest import serve_app
from tests.test_local_backend import RecordingDecoder

GREEDY = ("", 0.0, 40, 0.9, 1.0)  # system prompt, temperature, max new tokens, top-p, repetition penalty


def test_reply_streams_in_growing_prefixes(client):
    job = client.submit("Tell me about falcons.", "", 0.6, 60, 0.9, 1.0, api_name="/chat")
    outputs = list(job)
    final = job.result()
    assert len(outputs) > 5
    assert all(final.startswith(text) for text in outputs)
    assert final == outputs[-1] and final


def first_reply(app_url, *args):
    """A reply in a new conversation (a Client keeps its conversation across calls)."""
    return Client(app_url, verbose=False).predict(*args, api_name="/chat")


def test_greedy_settings_through_the_api_are_deterministic(app_url):
    first = first_reply(app_url, "Plan a trip to Lisbon.", *GREEDY)
    second = first_reply(app_url, "Plan a trip to Lisbon.", *GREEDY)
    assert first == second and first


def test_a_client_keeps_its_conversation_across_calls(app_url):
    client = Client(app_url, verbose=False)
    client.predict("Plan a trip to Lisbon.", *GREEDY, api_name="/chat")
    follow_up = client.predict("Plan a trip to Lisbon.", *GREEDY, api_name="/chat")
    assert follow_up != first_reply(app_url, "Plan a trip to Lisbon.", *GREEDY)


def test_system_prompt_and_max_new_tokens_change_the_reply(app_url, local_backend):
    plain = first_reply(app_url, "Hello", "", 0.0, 40, 0.9, 1.0)
    with_system = first_reply(app_url, "Hello", "You are a pirate.", 0.0, 40, 0.9, 1.0)
    short = first_reply(app_url, "Hello", "", 0.0, 3, 0.9, 1.0)
    assert with_system != plain
    assert plain.startswith(short) and local_backend.count_tokens(short) <= 3 < local_backend.count_tokens(plain)


@pytest.mark.parametrize(
    "args, named",
    [
        (("hi", "", -1.0, 40, 0.9, 1.0), "temperature"),
        (("hi", "", 0.5, 0, 0.9, 1.0), "max_new_tokens"),
        (("hi", "", 0.5, 40, 1.5, 1.0), "top_p"),
        (("hi", "", 0.5, 40, 0.9, 3.0), "repetition_penalty"),
        (("hi", "", "warm", 40, 0.9, 1.0), "temperature"),
    ],
)
def test_bad_parameters_get_an_error_naming_them(client, args, named):
    with pytest.raises(Exception) as raised:
        client.predict(*args, api_name="/chat")
    assert named in str(raised.value)


def test_empty_and_oversized_messages_get_clear_errors(client):
    with pytest.raises(Exception, match="type a message"):
        client.predict("  \n ", *GREEDY, api_name="/chat")
    with pytest.raises(Exception, match="limit is 20,000"):
        client.predict("x" * 20_001, *GREEDY, api_name="/chat")


def test_prompt_that_cannot_fit_says_so(client):
    with pytest.raises(Exception, match="tokens long"):
        client.predict("word " * 3000, *GREEDY, api_name="/chat")


def test_api_cancel_stops_the_models_generation(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    decoder = RecordingDecoder(PlainDecoder(model, tokenizer))
    backend = LocalBackend(model, tokenizer, model_name="tiny", context_length=2048, decoder=decoder)
    with serve_app(backend, Settings()) as url:
        client = Client(url, verbose=False)
        job = client.submit("Tell me a long story.", "", 1.0, 2048, 0.9, 1.0, api_name="/chat")
        for index, _ in enumerate(job):
            if index == 2:
                break
        job.cancel()
        assert decoder.finished.wait(10)
    backend.close()
    assert decoder.finish_reason == FINISH_CANCELLED
    assert decoder.emitted < 2000
