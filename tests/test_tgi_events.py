"""TGI's stream lines, parsed without any HTTP: literal lines as TGI 3.x and older routers send them."""

from __future__ import annotations

import json

import pytest

from chat.backends.remote.tgi_events import LineBuffer, parse_line
from chat.conversation.backend import FINISH_LENGTH, FINISH_STOP
from chat.conversation.errors import BackendBusy, ContextOverflow, GenerationFailed, RequestRejected

TOKEN = '{"index":1,"token":{"id":415,"text":" Hello","logprob":-0.3,"special":false},"generated_text":null,"details":null}'
LAST = (
    '{"index":3,"token":{"id":11,"text":"<|endoftext|>","logprob":-0.1,"special":true},'
    '"generated_text":" Hello!","details":{"finish_reason":"eos_token","generated_tokens":3,"seed":42}}'
)


@pytest.mark.parametrize("prefix", ["data:", "data: "])
def test_token_lines_parse_with_or_without_the_space(prefix):
    token = parse_line(prefix + TOKEN)
    assert (token.text, token.id, token.finish_reason) == (" Hello", 415, None)


@pytest.mark.parametrize(
    "line", ["", ":", ": keep-alive", "event: message", "id: 3", "data:", "data: [DONE]"]
)
def test_blank_comment_and_other_lines_carry_no_token(line):
    assert parse_line(line) is None


def test_the_last_event_ends_the_turn_and_hides_the_special_token():
    token = parse_line("data:" + LAST)
    assert (token.text, token.finish_reason, token.seed) == ("", FINISH_STOP, 42)


@pytest.mark.parametrize(
    "reason, ours", [("length", FINISH_LENGTH), ("stop_sequence", FINISH_STOP), ("eos_token", FINISH_STOP)]
)
def test_finish_reasons_map_to_ours(reason, ours):
    details = json.dumps({"finish_reason": reason})
    line = 'data:{"token":{"id":1,"text":"x","special":false},"details":' + details + "}"
    assert parse_line(line).finish_reason == ours


@pytest.mark.parametrize(
    "event, kind",
    [
        ('{"error":"Model is overloaded","error_type":"overloaded"}', BackendBusy),
        (
            '{"error":"Input validation error: `inputs` tokens + `max_new_tokens` must be <= 2048. '
            'Given: 2000 `inputs` tokens and 100 `max_new_tokens`","error_type":"validation"}',
            ContextOverflow,
        ),
        (
            '{"error":"Input validation error: `temperature` must be strictly positive","error_type":"validation"}',
            RequestRejected,
        ),
        (
            '{"error":"Request failed during generation: Server error: CUDA OOM","error_type":"generation"}',
            GenerationFailed,
        ),
    ],
)
def test_error_events_raise_their_kind_without_server_text_for_the_user(event, kind):
    with pytest.raises(kind) as raised:
        parse_line("data:" + event)
    assert "CUDA" not in raised.value.user_message and "`" not in raised.value.user_message


def test_an_event_that_is_not_json_is_a_broken_stream_for_every_backend_that_parses_tgi_events():
    with pytest.raises(GenerationFailed, match="broke off"):
        parse_line('data:{"index": 3, "token": {"id": 7, "te')


def test_line_buffer_rebuilds_lines_split_anywhere_even_inside_a_character():
    stream = ("data:" + TOKEN.replace("Hello", "Grüße ✓") + "\n\n:\n\ndata: " + LAST + "\n\n").encode()
    for size in (1, 2, 3, 7, 64):
        buffer, lines = LineBuffer(), []
        for start in range(0, len(stream), size):
            lines += buffer.feed(stream[start : start + size])
        lines += buffer.finish()
        tokens = [t for t in map(parse_line, lines) if t is not None]
        assert [t.text for t in tokens] == [" Grüße ✓", ""]


def test_line_buffer_handles_crlf_and_a_last_line_without_newline():
    buffer = LineBuffer()
    assert buffer.feed(b"data:" + TOKEN.encode() + b"\r\n\r\ndata:" + LAST.encode()) == ["data:" + TOKEN, ""]
    assert buffer.finish() == ["data:" + LAST]
