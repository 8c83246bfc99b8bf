"""The TGI backend against the TGI protocol double (tests/tgi_double.py): wire format, budgets from
the server, credentials, cancel, every failure kind, and failover across endpoints."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from chat.backends.remote.failover import RemoteOptions
from chat.backends.remote.tgi import TGIBackend
from chat.conversation.errors import (
    BackendBusy,
    BackendTimeout,
    BackendUnavailable,
    ContextOverflow,
    GenerationFailed,
    PromptTooLong,
    RequestRejected,
)
from chat.conversation.params import GenerationParams
from chat.conversation.reply import stream_reply
from chat.conversation.turns import note_of, strip_note
from tests.tgi_double import DEFAULT_TEXT, Reply, TGIDouble, tokenize

QUICK = RemoteOptions(
    connect_timeout_s=2, first_token_timeout_s=1.0, token_timeout_s=0.5, busy_retries=1, backoff_s=0.01
)


@pytest.fixture
def tgi():
    with TGIDouble() as double:
        yield double


def backend_for(*doubles, **kwargs) -> TGIBackend:
    return TGIBackend([d.url for d in doubles], options=kwargs.pop("options", QUICK), **kwargs)


def texts(backend, prompt="User: Hi\nFalcon:", params=GenerationParams()):
    return [token.text for token in backend.stream(prompt, params)]


@pytest.mark.parametrize("prefix", ["data:", "data: "])
def test_streams_a_reply_token_by_token_while_hub_offline_mode_is_on(prefix):
    from huggingface_hub import constants

    assert constants.is_offline_mode()  # tests/conftest.py sets HF_HUB_OFFLINE=1
    with TGIDouble(data_prefix=prefix) as tgi:
        assert "".join(texts(backend_for(tgi))) == DEFAULT_TEXT
        assert tgi.generate_requests()[0].path == "/generate_stream"


def test_the_last_token_carries_the_finish_reason(tgi):
    tokens = list(backend_for(tgi).stream("Hi", GenerationParams()))
    assert [t.finish_reason for t in tokens[:-1]] == [None] * (len(tokens) - 1)
    assert tokens[-1].finish_reason == "stop" and tokens[-1].text == ""  # the EOS token is hidden


def test_prompt_budget_comes_from_the_server():
    with TGIDouble(max_total_tokens=1536) as tgi:
        backend = backend_for(tgi)
        assert backend.context_length() == 1536
        assert backend.count_tokens("User: Hi there\nFalcon:") == len(tokenize("User: Hi there\nFalcon:"))
        assert backend.model_name == tgi.model_id


def test_without_tokenize_the_count_never_underestimates():
    with TGIDouble(tokenize=False) as tgi:
        text = "Grüße aus Lissabon, " * 20
        assert backend_for(tgi).count_tokens(text) >= len(text)


def test_counts_are_cached_so_a_conversation_is_not_counted_again_and_again(tgi):
    backend = backend_for(tgi)
    for _ in range(3):
        backend.count_tokens("the same turn")
    assert sum(r.path == "/tokenize" for r in tgi.requests) == 1


def test_parameters_are_sent_the_way_tgi_accepts_them(tgi):
    params = GenerationParams(temperature=0.0, top_p=1.0, max_new_tokens=7, stop_sequences=tuple("abcdef"))
    texts(backend_for(tgi), params=params)
    sent = tgi.generate_requests()[0].body["parameters"]
    assert sent["do_sample"] is False and "temperature" not in sent and "top_p" not in sent
    assert sent["max_new_tokens"] == 7 and sent["stop"] == ["a", "b", "c", "d"]
    assert sent["details"] is True and sent["return_full_text"] is False


def test_stop_sequences_end_the_reply_on_the_server_and_on_the_page(tgi):
    params = GenerationParams(stop_sequences=(" city",))
    # TGI keeps the matched stop sequence in its text and ends the stream there ...
    assert "".join(texts(backend_for(tgi), params=params)) == "The falcon flies over the city"
    # ... and the reply loop's stop filter never shows it.
    reply = list(stream_reply(backend_for(tgi), "Hi", [], "", params, max_message_chars=1000))
    assert reply[-1] == "The falcon flies over the"


def test_a_token_is_sent_as_bearer_and_no_header_without_one(tgi, monkeypatch):
    texts(backend_for(tgi, token="hf_secret"))
    assert tgi.requests[-1].headers["authorization"] == "Bearer hf_secret"
    monkeypatch.setenv("HF_TOKEN", "hf_stored_for_the_hub")  # must not leak to a named server
    backend = backend_for(tgi)
    texts(backend)
    backend.count_tokens("x")
    assert all("authorization" not in r.headers for r in tgi.requests[1:])


def test_closing_the_stream_disconnects_the_server_within_a_second():
    with TGIDouble(tokens_per_second=20) as tgi:
        tgi.script(Reply(text="word " * 200))
        stream = backend_for(tgi).stream("Hi", GenerationParams(max_new_tokens=200))
        next(stream), next(stream)
        closed = time.monotonic()
        stream.close()
        assert tgi.wait_for_disconnects(1, timeout=1.0), "the server kept generating"
        assert time.monotonic() - closed < 1.0


@pytest.mark.parametrize(
    "fail, kind, partial",
    [
        ("http_429", BackendBusy, ""),
        ("overloaded", BackendBusy, ""),
        ("http_500", GenerationFailed, ""),
        ("http_503", BackendUnavailable, ""),
        ("validation", ContextOverflow, ""),
        ("silent_before", BackendTimeout, ""),
        ("silent_mid", BackendTimeout, "The falcon"),
        ("killed_mid", GenerationFailed, "The falcon"),
        ("error_mid", GenerationFailed, "The falcon"),
    ],
)
def test_each_failure_becomes_its_error_kind(tgi, fail, kind, partial):
    tgi.script(*[Reply(fail=fail)] * 3)
    got = []
    started = time.monotonic()
    with pytest.raises(kind):
        for token in backend_for(tgi).stream("Hi", GenerationParams()):
            got.append(token.text)
    assert "".join(got) == partial
    assert time.monotonic() - started < 3  # keep-alives do not keep a silent server alive


def test_other_validation_errors_are_rejections_without_server_text(tgi):
    tgi.script(Reply(fail="validation", error="Input validation error: `best_of` must be > 0 and <= 2"))
    with pytest.raises(RequestRejected) as raised:
        texts(backend_for(tgi))
    assert "`" not in raised.value.user_message


def test_a_busy_server_is_retried_before_the_user_hears_of_it(tgi):
    tgi.script(Reply(fail="http_429"))
    assert "".join(texts(backend_for(tgi))) == DEFAULT_TEXT
    assert len(tgi.generate_requests()) == 2


def test_a_refused_connection_is_unavailable():
    tgi = TGIDouble().start()
    tgi.stop()
    backend = backend_for(tgi)
    with pytest.raises(BackendUnavailable):
        texts(backend)
    assert not backend.healthy()


def test_healthy_while_any_endpoint_answers(tgi):
    down = TGIDouble().start()
    down.stop()
    assert backend_for(down, tgi).healthy()


def test_requests_take_turns_over_endpoints():
    with TGIDouble() as first, TGIDouble() as second:
        backend = backend_for(first, second)
        for _ in range(4):
            texts(backend)
        assert len(first.generate_requests()) == len(second.generate_requests()) == 2


def test_an_endpoint_that_is_down_is_skipped_without_the_user_noticing():
    with TGIDouble() as alive:
        down = TGIDouble().start()
        down.stop()
        backend = backend_for(down, alive)
        replies = ["".join(texts(backend)) for _ in range(4)]
        assert replies == [DEFAULT_TEXT] * 4
        assert backend.pool.order()[-1] == down.url  # cooling down: tried last


def test_the_servers_input_limit_is_kept_in_the_first_request():
    # /info tells max_input_tokens (40 here, far below the 2,048 context): the prompt is fitted to
    # it, so the server never refuses one and the reply says which turns the model did not see.
    with TGIDouble(max_input_tokens=40, max_total_tokens=2048) as tgi:
        history = [[f"question {i} " * 4, f"answer {i} " * 4] for i in range(6)]
        reply = list(
            stream_reply(
                backend_for(tgi), "And now?", history, "", GenerationParams(), max_message_chars=1000
            )
        )
        assert strip_note(reply[-1]) == DEFAULT_TEXT and "earliest turns" in note_of(reply[-1])
        (sent,) = tgi.generate_requests()
        assert len(tokenize(sent.body["inputs"])) <= 40 and "question 5" in sent.body["inputs"]


def test_a_server_side_length_error_drops_older_turns_instead_of_reaching_the_user():
    # A server that does not tell its input limit (as OpenAI-compatible ones do not): our fit (by
    # the context) lets the prompt through, the server rejects it, the reply loop drops turns.
    with TGIDouble(max_input_tokens=40, max_total_tokens=2048) as tgi:
        backend = backend_for(tgi)
        backend.max_input_tokens = lambda: None
        history = [[f"question {i} " * 4, f"answer {i} " * 4] for i in range(6)]
        reply = list(
            stream_reply(backend, "And now?", history, "", GenerationParams(), max_message_chars=1000)
        )
        assert strip_note(reply[-1]) == DEFAULT_TEXT
        sent = [len(tokenize(r.body["inputs"])) for r in tgi.generate_requests()]
        assert len(sent) > 1 and sent == sorted(sent, reverse=True) and sent[-1] <= 40
        assert "question 5" in tgi.generate_requests()[-1].body["inputs"]  # newest turns kept


def test_when_no_turn_is_left_to_drop_the_user_is_told_briefly():
    with TGIDouble(max_input_tokens=3) as tgi:
        backend = backend_for(tgi)
        backend.max_input_tokens = lambda: None  # as above: the server's refusal is what tells
        reply = list(
            stream_reply(
                backend, "A message that is long", [], "", GenerationParams(), max_message_chars=1000
            )
        )
        assert reply[-1].endswith(ContextOverflow.user_message)


def test_an_input_limit_too_small_for_any_message_is_said_so_not_sent():
    with TGIDouble(max_input_tokens=3) as tgi:
        with pytest.raises(PromptTooLong) as raised:
            list(
                stream_reply(
                    backend_for(tgi), "A message", [], "", GenerationParams(), max_message_chars=1000
                )
            )
        assert tgi.generate_requests() == []
    assert raised.value.user_message == (
        "Your message is about 2 tokens long, but the model server takes prompts of at most 3 tokens, "
        "which the conversation's format alone fills: no message fits until the server takes more."
    )


def test_a_side_route_dropped_without_an_answer_is_asked_once_more():
    """A server that closes a connection as the request arrives (a kept-alive connection timing
    out) gets the same GET /info again on a new connection; a second drop is an error."""
    answers = [None, b'{"max_total_tokens": 4096}', None, None]  # None: close without answering
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        for answer in answers:
            connection, _ = listener.accept()
            with connection:
                connection.recv(65536)
                if answer is not None:
                    connection.sendall(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(answer), answer)
                    )

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    backend = TGIBackend([url], options=QUICK)
    try:
        assert backend.get_json("GET", f"{url}/info") == {"max_total_tokens": 4096}
        with pytest.raises(GenerationFailed):
            backend.get_json("GET", f"{url}/info")
    finally:
        backend.close()
        listener.close()


# -- a hung endpoint, and the turns each reply takes (real sockets) ------------------------------

PATIENT = RemoteOptions(
    connect_timeout_s=1.0, first_token_timeout_s=5.0, token_timeout_s=5.0, busy_retries=0, cooldown_s=60
)


def chat(backend, message="Hello there") -> str:
    return list(stream_reply(backend, message, [], "", GenerationParams(), max_message_chars=1000))[-1]


def test_each_reply_advances_the_round_robin_once():
    """Counting the prompt's tokens (a question on the side, /tokenize) and the stream used to
    advance the turn once each: with two endpoints, every stream went to the same one."""
    with TGIDouble() as first, TGIDouble() as second:
        backend = backend_for(first, second)
        for number in range(10):
            assert chat(backend, f"Message number {number}") == DEFAULT_TEXT
        assert len(first.generate_requests()) == len(second.generate_requests()) == 5


def test_a_hung_endpoint_costs_one_connect_timeout_once_and_start_up_does_not_wait_for_it():
    """A server that accepts connections and never answers: start-up (the context, asked of
    every endpoint at once) takes the healthy one's answer; the first request to reach the hung
    one waits the connect timeout for its first byte, after which it is tried last, and only a
    health check in the background goes back to it."""
    from tests.hung_server import HungServer

    with HungServer() as hung, TGIDouble() as alive:
        started = time.monotonic()
        backend = TGIBackend([hung.url, alive.url], options=PATIENT)
        try:
            assert backend.context_length() == alive.max_total_tokens
            assert time.monotonic() - started < PATIENT.connect_timeout_s  # nobody waited for it
            started = time.monotonic()
            replies = [chat(backend, f"Message number {number}") for number in range(6)]
            elapsed = time.monotonic() - started
        finally:
            backend.close()
        assert replies == [DEFAULT_TEXT] * 6
        assert len(alive.generate_requests()) == 6
        # One wait of the connect timeout at most (the start-up question may already have put it
        # last), never the first-token timeout, never once per message.
        assert elapsed < PATIENT.connect_timeout_s + 2.0, elapsed
        assert hung.connections <= 2  # the start-up question, and at most one request after it


def test_a_stream_may_pause_longer_than_the_connect_timeout_once_it_has_answered():
    """The connect timeout covers the answer's first byte (its headers); past them, a stream's
    events may be as far apart as the token timeouts allow (a long prompt's prefill, a slow
    model): here 1.5 s between tokens, with no keep-alive between them, under a 1 s connect timeout."""
    with TGIDouble(tokens_per_second=1 / 1.5, keepalive_s=10) as slow:
        backend = backend_for(slow, options=PATIENT)
        try:
            tokens = [t.text for t in backend.stream("User: Hi\nFalcon:", GenerationParams(max_new_tokens=2))]
        finally:
            backend.close()
        assert "".join(tokens) == "".join(tokenize(DEFAULT_TEXT)[:2])
