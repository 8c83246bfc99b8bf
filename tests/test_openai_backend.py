"""The OpenAI-compatible backend end to end against a real `transformers serve` process on the
tiny Falcon (CPU), plus credentials and failures against loopback servers.

The tiny model has random weights: its text is gibberish, but greedy decoding makes it the same
for the same prompt, so the tests compare the server's replies with each other.
"""

from __future__ import annotations

import time

import pytest

from chat.backends.remote.base import estimate_tokens
from chat.backends.remote.failover import RemoteOptions
from chat.backends.remote.openai_compat import OpenAIBackend
from chat.conversation.backend import FINISH_LENGTH, FINISH_STOP
from chat.conversation.errors import BackendError, BackendUnavailable, ConfigError
from chat.conversation.params import GenerationParams
from chat.conversation.reply import stream_reply
from tests.helpers import free_port
from tests.tgi_double import TGIDouble

OPTIONS = RemoteOptions(connect_timeout_s=5, first_token_timeout_s=30, token_timeout_s=30, busy_retries=0)
GREEDY = GenerationParams(temperature=0.0, max_new_tokens=8)


class RecordingBackend(OpenAIBackend):
    """The real backend, noting each prompt and reply budget it sends."""

    def __init__(self, *args, **kwargs):
        self.sent: list[tuple[str, int]] = []
        super().__init__(*args, **kwargs)

    def open_stream(self, endpoint, prompt, params, watchdog):
        self.sent.append((prompt, params.max_new_tokens))
        return super().open_stream(endpoint, prompt, params, watchdog)


@pytest.fixture(scope="module")
def served(transformers_serve):
    return RecordingBackend([transformers_serve.url], model=transformers_serve.model, options=OPTIONS)


def reply_tokens(backend, params=GREEDY, prompt="User: Hello\nFalcon:"):
    return list(backend.stream(prompt, params))


def test_streams_a_reply_token_by_token_from_the_real_server(served):
    tokens = reply_tokens(served)
    assert 2 < len(tokens) <= GREEDY.max_new_tokens + 1  # one per token, then the finish
    assert tokens[-1].finish_reason == FINISH_LENGTH
    assert "".join(t.text for t in tokens) == "".join(t.text for t in reply_tokens(served))


def test_the_server_stops_at_a_stop_sequence(served):
    unconstrained = "".join(
        t.text for t in reply_tokens(served, GenerationParams(temperature=0.0, max_new_tokens=30))
    )
    stop = unconstrained[2:5]
    assert len(stop) == 3
    params = GenerationParams(temperature=0.0, max_new_tokens=30, stop_sequences=(stop,))
    tokens = reply_tokens(served, params)
    assert tokens[-1].finish_reason == FINISH_STOP
    assert len("".join(t.text for t in tokens)) < len(unconstrained)  # the server ended early
    reply = list(stream_reply(served, "Hello", [], "", params, max_message_chars=1000))
    expected = unconstrained[: unconstrained.index(stop)].strip()
    assert reply[-1] == expected or (not expected and "without writing" in reply[-1])


def test_cancelling_ends_the_generation_on_the_server(served):
    # The server generates one request at a time. If it missed the disconnect, the next request
    # would wait behind ~8,000 tokens (over half a minute here); it is answered at once instead.
    expected = "".join(t.text for t in reply_tokens(served))
    long_one = served.stream("User: Hello\nFalcon:", GenerationParams(temperature=0.0, max_new_tokens=8000))
    next(long_one), next(long_one)
    long_one.close()
    started = time.monotonic()
    assert "".join(t.text for t in reply_tokens(served)) == expected
    assert time.monotonic() - started < 10


def test_a_long_conversation_is_fitted_to_the_context(transformers_serve):
    backend = RecordingBackend(
        [transformers_serve.url], model=transformers_serve.model, options=OPTIONS, max_total_tokens=300
    )
    history = [[f"Question number {i} about falcons?", f"Answer number {i}."] for i in range(40)]
    reply = list(
        stream_reply(backend, "And the last one?", history, "Be brief.", GREEDY, max_message_chars=1000)
    )
    assert not any(kind.user_message in reply[-1] for kind in all_subclasses(BackendError))
    prompt, budget = backend.sent[-1]
    assert estimate_tokens(prompt) + budget <= 300
    assert "Question number 39" in prompt and "Question number 0 " not in prompt


def test_healthy_while_the_server_answers(served):
    assert served.healthy()


def test_the_context_comes_from_configuration_when_the_server_does_not_say(served):
    assert served.context_length() == 2048  # transformers serve's /v1/models does not list it
    assert served.count_tokens("Grüße") >= len("Grüße")  # no /tokenize: a safe over-estimate


def test_a_server_without_tokenize_is_asked_once_then_counts_are_estimated():
    with TGIDouble(tokenize=False) as server:  # answers 404 to /tokenize, records requests
        backend = OpenAIBackend([server.url + "/v1"], model="m", options=OPTIONS)
        for text in ("one text", "another text", "a third"):
            assert backend.count_tokens(text) >= len(text)
        assert [r.path for r in server.requests].count("/tokenize") == 1


def test_a_model_name_is_needed_when_the_server_lists_none(transformers_serve):
    with pytest.raises(ConfigError, match="--model"):
        OpenAIBackend([transformers_serve.url], options=OPTIONS)


def test_an_api_key_is_sent_as_bearer_and_no_header_without_one():
    with TGIDouble() as server:  # records headers; answers 404 to /v1/completions
        sent = {}
        for key in ("sk-test", None):
            before = len(server.requests)
            backend = OpenAIBackend([server.url + "/v1"], model="m", api_key=key, options=OPTIONS)
            with pytest.raises(BackendError):  # the double answers 404 to /v1/completions
                list(backend.stream("x", GREEDY))
            backend.count_tokens(f"counted with {key}")
            sent[key] = server.requests[before:]
        with_key, without = sent["sk-test"], sent[None]
        assert {r.headers.get("authorization") for r in with_key} == {"Bearer sk-test"}
        assert all("authorization" not in r.headers for r in without)
        assert {r.path for r in server.requests} == {"/v1/completions", "/tokenize"}


def test_a_server_that_is_down_is_unavailable_and_the_app_still_starts():
    backend = OpenAIBackend(
        [f"http://127.0.0.1:{free_port()}/v1"], model="m", options=OPTIONS, max_total_tokens=1024
    )
    assert backend.context_length() == 1024 and not backend.healthy()
    with pytest.raises(BackendUnavailable):
        list(backend.stream("x", GREEDY))


def all_subclasses(cls):
    return {cls} | {sub for direct in cls.__subclasses__() for sub in all_subclasses(direct)}


@pytest.mark.parametrize(
    "given, used",
    [
        ("http://h:8000", "http://h:8000/v1"),
        ("http://h:8000/", "http://h:8000/v1"),
        ("http://h:8000/v1/", "http://h:8000/v1"),
        ("https://h/proxy/v1", "https://h/proxy/v1"),
    ],
)
def test_an_endpoint_without_a_path_means_its_v1(given, used):
    from chat.backends.remote.openai_compat import openai_base_url

    assert openai_base_url(given) == used
