"""A short run of bench/load.py (correctness only, no timings), and what a full queue tells new users."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from gradio_client import Client
from gradio_client.utils import QueueError

from bench.load import TimedDouble, run_phase
from chat.backends.remote.tgi import TGIBackend
from chat.config import Settings
from tests.helpers import serve_app
from tests.reliability import ARGS, QUICK, app_on_double, settled
from tests.tgi_double import Reply


def test_concurrent_sessions_get_every_reply_complete_and_exact():
    with TimedDouble(reply_tokens=24, tokens_per_second=100) as double:
        backend = TGIBackend([double.url], options=QUICK)
        with serve_app(backend, Settings(backend="tgi", endpoints=(double.url,))) as url:
            result = asyncio.run(
                run_phase(url, double, sessions=12, turns=2, tokens_per_second=100, reply_tokens=24)
            )
        backend.close()
    assert result["replies"] == 24
    assert (result["completed"], result["failed"], result["garbled"]) == (24, 0, 0), result["errors"]
    assert result["backend_disconnects"] == 0


def test_a_full_queue_tells_new_users_the_app_is_busy():

    # One reply at a time, one waiting: the third user is turned away at once.
    with app_on_double(tokens_per_second=20, concurrency_limit=1, queue_size=1) as (url, double):
        double.reply_for = lambda body: Reply(text="word " * 200)
        running = Client(url, verbose=False).submit("First", *ARGS, api_name="/chat")
        next(iter(running))
        waiting = Client(url, verbose=False).submit("Second", *ARGS, api_name="/chat")
        with httpx.Client(base_url=url) as http:
            assert settled(lambda: "falcon_chat_queue_depth 1.0" in http.get("metrics").text)
        with pytest.raises(QueueError, match="Queue is full! Please try again"):
            Client(url, verbose=False).predict("Third", *ARGS, api_name="/chat")
        with httpx.Client(base_url=url) as http:  # the page's own request: HTTP 503, shown as busy
            refused = http.post("gradio_api/call/chat", json={"data": ["Fourth", *ARGS, None]})
        assert refused.status_code == 503 and "Queue is full" in refused.text
        running.cancel()
        waiting.cancel()


def test_the_queue_size_is_configured_by_flag_or_environment_with_a_one_line_error():
    from chat.config import Settings, load_settings
    from chat.conversation.errors import ConfigError

    assert load_settings([], environ={}).queue_size == Settings().queue_size == 100
    assert load_settings(["--queue-size", "5"], environ={"QUEUE_SIZE": "7"}).queue_size == 5
    assert load_settings([], environ={"QUEUE_SIZE": "7"}).queue_size == 7
    with pytest.raises(ConfigError, match="--queue-size must be a whole number"):
        load_settings(["--queue-size", "many"], environ={})
