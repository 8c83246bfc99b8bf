"""The whole app on remote backends, driven through gradio_client: TGI (the protocol double) with
failover, failures and cancel, and the OpenAI backend on a real `transformers serve`."""

from __future__ import annotations

import concurrent.futures

import pytest
from gradio_client import Client

from chat.config import Settings
from chat.conversation.errors import BackendBusy, GenerationFailed
from chat.conversation.turns import strip_note
from chat.factory import build_backend
from tests.helpers import serve_app
from tests.tgi_double import DEFAULT_TEXT, Reply, TGIDouble


def remote_settings(*endpoints, **overrides) -> Settings:
    return Settings(
        backend="tgi",
        endpoints=tuple(endpoints),
        first_token_timeout_s=2.0,
        token_timeout_s=1.0,
        busy_retries=0,
        **overrides,
    )


def chat(url: str, message: str = "Hello") -> str:
    """One message in a new conversation; the reply as the page shows it."""
    return Client(url, verbose=False).predict(message, api_name="/chat")


@pytest.fixture(scope="module")
def tgi_app():
    """Two TGI endpoints, the first of them down (it refuses connections)."""
    down = TGIDouble().start()
    down.stop()
    with TGIDouble(tokens_per_second=200) as alive:
        settings = remote_settings(down.url, alive.url)
        backend = build_backend(settings)
        with serve_app(backend, settings) as url:
            yield url, alive, backend


def test_every_chat_is_answered_while_one_endpoint_is_down(tgi_app):
    url, alive, _ = tgi_app
    before = len(alive.generate_requests())
    assert [strip_note(chat(url)) for _ in range(3)] == [DEFAULT_TEXT] * 3
    assert len(alive.generate_requests()) - before == 3


def test_remote_chats_stream_at_the_same_time(tgi_app):
    url, alive, backend = tgi_app
    assert backend.concurrency_limit == 64
    clients = [Client(url, verbose=False) for _ in range(4)]  # connected before any chat starts
    alive.peak_active = 0
    alive.script(*[Reply(text="word " * 200)] * 4)  # about a second each
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda client: client.predict("Hello", api_name="/chat"), clients))
    assert all(strip_note(reply).startswith("word word") for reply in replies)
    assert alive.peak_active >= 3


def test_a_failure_mid_reply_keeps_the_partial_text_with_a_clear_note(tgi_app):
    url, alive, _ = tgi_app
    alive.script(Reply(fail="error_mid", after_tokens=3))
    reply = chat(url)
    assert reply.startswith("The falcon flies") and GenerationFailed.user_message in reply
    assert "CUDA" not in reply
    assert strip_note(chat(url)) == DEFAULT_TEXT  # and the app keeps serving


def test_a_busy_server_is_reported_as_busy(tgi_app):
    url, alive, _ = tgi_app
    alive.script(Reply(fail="http_429"))
    assert BackendBusy.user_message in chat(url)


def test_stop_through_the_api_ends_the_generation_on_the_server(tgi_app):
    url, alive, _ = tgi_app
    alive.script(Reply(text="word " * 2000))
    alive.tokens_per_second = 20  # 256 tokens: over ten seconds, unless stopped
    try:
        disconnects = alive.disconnects
        job = Client(url, verbose=False).submit("Hello", api_name="/chat")
        for count, _ in enumerate(job):
            if count >= 2:
                break
        job.cancel()
        # The reply would run for over ten seconds; the 1 s bound itself is checked without Gradio
        # in test_tgi_backend (this machine's load can delay Gradio's cancel by a few hundred ms).
        assert alive.wait_for_disconnects(disconnects + 1, timeout=5.0)
    finally:
        alive.tokens_per_second = 200


def test_the_openai_backend_chats_with_a_real_transformers_serve(transformers_serve):
    # A small context keeps the reply short: the fit leaves it what the prompt does not take.
    settings = Settings(
        backend="openai",
        endpoints=(transformers_serve.url,),
        model=transformers_serve.model,
        max_total_tokens=64,
    )
    backend = build_backend(settings)
    with serve_app(backend, settings) as url:
        reply = chat(url, "Tell me about falcons.")
    assert reply and "⚠️" not in reply and "could not be reached" not in reply
