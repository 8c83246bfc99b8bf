"""Faults, through the whole app (gradio_client against the served page, TGI double behind it): the
affected user gets a clear message under whatever part of the reply arrived, a user streaming at the
same time is unaffected, and the app keeps serving. tests/test_tgi_backend.py covers the same faults
at the backend level (error kinds, timings); these check what users of the running app see."""

from __future__ import annotations

import dataclasses
import random

import httpx
import pytest
from gradio_client import Client

from chat.backends.local.backend import LocalBackend
from chat.config import Settings
from chat.conversation.errors import BackendBusy, BackendTimeout, GenerationFailed
from chat.conversation.turns import NOTE_MARK, strip_note
from chat.engine.build import Engine, load_model
from chat.engine.decoders import PlainDecoder
from tests.helpers import serve_app
from tests.reliability import (
    ARGS,
    ENDLESS_TOKENS,
    HEALTHY_TEXT,
    HUGE_TOKEN,
    LONG_LINE_BYTES,
    QUICK,
    app_on_double,
    settled,
)
from tests.tgi_double import Reply, tokenize

BROKE_OFF = "The connection to the model server broke off. Please try again."
UNREADABLE = "The model server sent a reply this app could not read. Please try again."


@pytest.fixture(scope="module")
def app():
    with app_on_double(tokens_per_second=100) as served:
        yield served


@pytest.fixture(scope="module")
def users(app):
    """Three users who stay connected across tests (a Client takes ~0.3 s to connect)."""
    return [Client(app[0], verbose=False) for _ in range(3)]


def start_healthy(url, client=None):
    """A healthy user's reply, already streaming when this returns."""
    job = (client or Client(url, verbose=False)).submit("Tell me about falcons.", *ARGS, api_name="/chat")
    next(iter(job))  # its first words have arrived
    return job


def note_of(reply: str) -> str:
    words = strip_note(reply)
    without_footer = reply[: reply.rindex("\n\n<sub>")] if "<sub>" in reply else reply
    return without_footer[len(words) :].strip()


@pytest.mark.parametrize(
    "fault, partial, message",
    [
        ("killed_mid", "The falcon", BROKE_OFF),  # the server process dies mid-reply
        ("silent_before", "", BackendTimeout.user_message),  # accepts, never sends a token
        ("silent_mid", "The falcon", BackendTimeout.user_message),  # goes quiet mid-reply
        ("overloaded", "", BackendBusy.user_message),  # TGI's in-stream "overloaded" event
        ("malformed", "The falcon", BROKE_OFF),  # an event that is not JSON
        ("truncated", "The falcon", BROKE_OFF),  # the stream ends without TGI's final event
        ("error_mid", "The falcon", GenerationFailed.user_message),  # CUDA OOM mid-reply
        ("number_text", "The falcon", UNREADABLE),  # a token whose text is a number
        ("object_text", "The falcon", UNREADABLE),  # ... or an object
        ("long_line", "The falcon", UNREADABLE),  # one line that never ends
    ],
)
def test_a_failing_reply_tells_its_user_keeps_the_partial_and_spares_others(
    app, users, fault, partial, message
):
    url, double = app
    healthy_user, affected_user, later_user = users
    healthy = start_healthy(url, healthy_user)
    reply = affected_user.predict(f"[fault:{fault}] Hi", *ARGS, api_name="/chat")
    assert strip_note(reply) == partial
    assert note_of(reply) == NOTE_MARK + (f"Reply cut short: {message}" if partial else message)
    assert strip_note(healthy.result()) == HEALTHY_TEXT
    assert strip_note(later_user.predict("Again?", *ARGS, api_name="/chat")) == HEALTHY_TEXT


def test_a_storm_of_429s_tells_every_user_busy_and_the_app_recovers(app):
    url, double = app
    healthy = start_healthy(url)
    storm = [
        Client(url, verbose=False).submit("[fault:http_429] Hi", *ARGS, api_name="/chat") for _ in range(6)
    ]
    for job in storm:
        assert note_of(job.result()) == NOTE_MARK + BackendBusy.user_message
    assert strip_note(healthy.result()) == HEALTHY_TEXT, healthy.result()  # footer: why it ended
    assert strip_note(Client(url, verbose=False).predict("Again?", *ARGS, api_name="/chat")) == HEALTHY_TEXT


def test_a_one_megabyte_token_arrives_whole(app):
    url, _ = app
    healthy = start_healthy(url)
    reply = Client(url, verbose=False).predict("[fault:huge_token] Hi", *ARGS, api_name="/chat")
    assert strip_note(reply) == f"Here: {HUGE_TOKEN} done"
    assert strip_note(healthy.result()) == HEALTHY_TEXT


def test_a_server_that_ignores_max_new_tokens_is_cut_at_the_limit(app):
    """Before, 420,799 tokens in 30 s reached the page from such a server; now the reply ends at
    the tokens asked for, as a length-limited reply, and the server's stream is closed."""
    url, double = app
    client = Client(url, verbose=False)
    disconnects = double.disconnects
    reply = client.predict("[fault:endless] Hi", *ARGS, api_name="/chat")
    assert len(tokenize(strip_note(reply))) == ARGS[2] < ENDLESS_TOKENS  # max new tokens
    assert client.predict(api_name="/reply_stats")["finish_reason"] == "length"
    assert double.wait_for_disconnects(disconnects + 1)  # it was still sending: the app hung up


def test_a_line_without_end_is_refused_before_it_is_held_whole(app):
    url, double = app
    double.bytes_sent = 0
    reply = Client(url, verbose=False).predict("[fault:long_line] Hi", *ARGS, api_name="/chat")
    assert note_of(reply) == NOTE_MARK + f"Reply cut short: {UNREADABLE}"
    assert settled(lambda: double.active == 0)
    assert double.bytes_sent < LONG_LINE_BYTES / 2  # the app hung up after a few megabytes


def test_a_client_that_goes_away_mid_stream_closes_the_upstream_request():
    # A closed tab is a closed event stream: no cancel request is sent, the connection just ends.
    with app_on_double(tokens_per_second=20) as (url, double):
        healthy = start_healthy(url)
        with httpx.Client(base_url=url, timeout=10) as http:
            posted = http.post("gradio_api/call/chat", json={"data": ["Tell me more.", *ARGS, None]})
            with http.stream("GET", f"gradio_api/call/chat/{posted.json()['event_id']}") as stream:
                lines = stream.iter_lines()
                while not next(lines).startswith("event: generating"):
                    pass
        assert double.wait_for_disconnects(1, timeout=5), "the server kept generating for nobody"
        assert strip_note(healthy.result()) == HEALTHY_TEXT
        assert double.completed >= 1


def test_a_client_that_goes_away_before_the_first_token_closes_the_upstream_request():
    # The server is still reading the prompt (no token yet) when the tab is closed: Gradio only
    # notices when the reply next yields, which it would not before the first token.
    waits_long = dataclasses.replace(QUICK, first_token_timeout_s=60.0)
    with app_on_double(options=waits_long) as (url, double):
        double.reply_for = lambda body: Reply(fail="silent_before")
        with httpx.Client(base_url=url, timeout=10) as http:
            posted = http.post("gradio_api/call/chat", json={"data": ["Tell me more.", *ARGS, None]})
            with http.stream("GET", f"gradio_api/call/chat/{posted.json()['event_id']}"):
                assert settled(lambda: double.generate_requests(), timeout_s=10)
        assert double.wait_for_disconnects(1, timeout=5), "the server kept the stream for nobody"


def test_a_cancelled_api_call_closes_the_upstream_request(app):
    url, double = app
    before = double.disconnects
    job = Client(url, verbose=False).submit("Tell me more.", *ARGS, api_name="/chat")
    next(iter(job))
    job.cancel()
    assert double.wait_for_disconnects(before + 1, timeout=5)


class RaisingDecoder:
    """The real decode loop, raising after a few tokens (a CUDA error, a bug in a kernel)."""

    name = "raising"

    def __init__(self, decoder, after: int):
        self.decoder, self.after = decoder, after

    def generate(self, input_ids, params, seed, emit, cancelled):
        count = 0

        def emit_then_fail(token_id):
            nonlocal count
            if count == self.after and params.max_new_tokens == 77:  # only the "failing" user's reply
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            count += 1
            emit(token_id)

        return self.decoder.generate(input_ids, params, seed, emit_then_fail, cancelled)


def test_the_local_model_raising_mid_generation_is_a_message_and_the_next_user_is_served(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    decoder = RaisingDecoder(PlainDecoder(model, tokenizer), after=5)
    backend = LocalBackend(
        Engine.of_model(model, tokenizer, context_length=2048, decoder=decoder), model_name="tiny"
    )
    try:
        with serve_app(backend, Settings()) as url:
            failing = Client(url, verbose=False).submit("Hi", "", 0.0, 77, 0.9, 1.0, api_name="/chat")
            waiting = Client(url, verbose=False).submit("Hi", "", 0.0, 40, 0.9, 1.0, api_name="/chat")
            reply = failing.result()
            assert strip_note(reply) and len(backend.tokenizer(strip_note(reply))["input_ids"]) <= 6
            assert note_of(reply) == NOTE_MARK + f"Reply cut short: {GenerationFailed.user_message}"
            served = strip_note(waiting.result())
            assert served and NOTE_MARK not in waiting.result()
            assert backend.healthy()
            again = Client(url, verbose=False).predict("Hi", "", 0.0, 40, 0.9, 1.0, api_name="/chat")
            assert strip_note(again) == served  # greedy: the same reply, from a model still working
    finally:
        backend.close()


def test_random_faults_in_a_crowd_never_touch_the_healthy_replies(app):
    url, _ = app
    rng = random.Random(6)
    faults = ["killed_mid", "silent_mid", "overloaded", "malformed", "truncated", "error_mid", None]
    jobs = []
    for _ in range(10):
        fault = rng.choice(faults)
        message = f"[fault:{fault}] Hi" if fault else "Hello"
        jobs.append((fault, Client(url, verbose=False).submit(message, *ARGS, api_name="/chat")))
    for fault, job in jobs:
        reply = job.result()
        if fault is None:
            assert strip_note(reply) == HEALTHY_TEXT
        else:
            assert note_of(reply).startswith(NOTE_MARK)
