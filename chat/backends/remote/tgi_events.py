"""TGI's stream events, as `Token`s: the one place that knows their shape.

TGI (and SageMaker's Hugging Face LLM containers, which run TGI) send server-sent events, one JSON
object per `data:` line (`data:{...}` from older routers, `data: {...}` from newer ones), blank
lines between events, `:` comment lines as keep-alives, and no `[DONE]`. Each event carries one
token; the last one also carries `generated_text` and `details.finish_reason`. An error arrives as
an event `{"error": "...", "error_type": "validation" | "overloaded" | "generation" | ...}` inside a
stream that started with HTTP 200.

Every stream arrives as bytes split anywhere (HTTP chunks, SageMaker's event-stream parts), so
`LineBuffer` rebuilds the lines first, and refuses a line longer than `MAX_LINE_BYTES` (a server
sending one endless line would otherwise fill memory). TGI and SageMaker send `generate_request`
and read the answer with `tokens_from_lines`, so neither can drift from the other. What a server
sends is untrusted: an event that is not an object, a token whose text is not text, a finish
reason that is not a word, are `GenerationFailed` with one sentence, never a library exception.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from chat.backends.remote.failover import error_for_event
from chat.conversation.backend import FINISH_LENGTH, FINISH_STOP, Token
from chat.conversation.errors import GenerationFailed
from chat.conversation.params import GenerationParams

# TGI's finish reasons -> ours. The matched stop sequence stays in TGI's text; our stop filter
# cuts it, so "stop_sequence" is just the end of the turn.
FINISH_REASONS = {"length": FINISH_LENGTH, "eos_token": FINISH_STOP, "stop_sequence": FINISH_STOP}


TGI_MAX_STOP_SEQUENCES = 4  # TGI's default --max-stop-sequences; our stop filter applies them all
# The longest line of a stream read: a 1 MB token, JSON-escaped, with room to spare.
MAX_LINE_BYTES = 4 * 1024 * 1024
UNREADABLE = "The model server sent a reply this app could not read. Please try again."
BROKE_OFF = "The connection to the model server broke off. Please try again."


def unreadable(detail: str) -> GenerationFailed:
    """The error for something a server sent that is not what its protocol says."""
    return GenerationFailed(UNREADABLE, detail=detail)


def tgi_parameters(params: GenerationParams) -> dict:
    """Our parameters as TGI accepts them (it rejects temperature 0 and top_p 1.0)."""
    sampling = {}
    if not params.greedy:
        sampling = dict(
            temperature=params.temperature,
            top_p=params.top_p if params.top_p < 1.0 else None,
            top_k=params.top_k or None,
        )
    return dict(
        do_sample=not params.greedy,
        max_new_tokens=params.max_new_tokens,
        repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1.0 else None,
        seed=params.seed,
        stop=list(params.stop_sequences[:TGI_MAX_STOP_SEQUENCES]),
        **sampling,
    )


def generate_request(prompt: str, params: GenerationParams) -> dict:
    """The body of a streaming generate request (TGI rejects nulls for some parameters: left out)."""
    parameters = {**tgi_parameters(params), "details": True, "return_full_text": False}
    return {
        "inputs": prompt,
        "parameters": {name: value for name, value in parameters.items() if value is not None},
        "stream": True,
    }


def tokens_from_lines(
    lines: Iterable[str], parse=None, *, final_event: str = "TGI's final event"
) -> Iterator[Token]:
    """The tokens of one stream (`parse` turns a line into a Token or None; TGI's `parse_line` by
    default); GenerationFailed if it ends without its final event (for TGI the one carrying
    `details`): such a stream was cut off (a proxy timing out, a server restarting), not a
    finished reply."""
    parse = parse or parse_line
    finished = False
    try:
        for line in lines:
            token = parse(line)
            if token is not None:
                finished = finished or token.finish_reason is not None
                yield token
    finally:
        close = getattr(lines, "close", None)
        if close is not None:
            close()  # the HTTP response under the lines: closing is cancelling
    if not finished:
        raise GenerationFailed(BROKE_OFF, detail=f"the stream ended without {final_event}")


class LineBuffer:
    """Bytes in arbitrary pieces -> complete text lines (a UTF-8 character may span pieces); a line
    longer than `max_line_bytes` is `GenerationFailed`, found before it is held whole."""

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES):
        self.max_line_bytes = max_line_bytes
        self._pending = b""

    def feed(self, chunk: bytes) -> list[str]:
        self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        if len(self._pending) > self.max_line_bytes or any(len(line) > self.max_line_bytes for line in lines):
            self._pending = b""
            raise unreadable(f"a line longer than {self.max_line_bytes:,} bytes")
        # b"\n" never occurs inside a multi-byte UTF-8 character, so whole lines decode cleanly.
        return [line.rstrip(b"\r").decode("utf-8", errors="replace") for line in lines]

    def finish(self) -> list[str]:
        rest, self._pending = self._pending, b""
        return [rest.rstrip(b"\r").decode("utf-8", errors="replace")] if rest.strip() else []


def stream_lines(chunks: Iterable[bytes], max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[str]:
    """The text lines of a byte stream, each at most `max_line_bytes` long."""
    lines = LineBuffer(max_line_bytes)
    for chunk in chunks:
        yield from lines.feed(chunk)
    yield from lines.finish()


def sse_event(line: str) -> dict | None:
    """The JSON event in one SSE line; None for blank, comment, non-data and `[DONE]` lines.
    GenerationFailed for an event that is not a JSON object (cut or garbled: nothing after it can
    be trusted). Shared by TGI's stream and the OpenAI-style streams (chat_events.py)."""
    if not line.startswith("data:"):
        return None
    payload = line[len("data:") :].strip()
    if not payload or payload == "[DONE]":
        return None
    try:
        event = json.loads(payload)
    except (ValueError, RecursionError):
        raise GenerationFailed(BROKE_OFF, detail=f"unreadable event: {payload[:200]}") from None
    if not isinstance(event, dict):
        raise unreadable(f"an event that is not an object: {payload[:200]}")
    return event


def text_field(value, what: str) -> str:
    """A text a server sent (None: none), or `unreadable` naming `what`."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise unreadable(f"{what} is {type(value).__name__}, not text: {str(value)[:100]}")
    return value


def object_field(value, what: str) -> dict:
    """An object a server sent (None: an empty one), or `unreadable` naming `what`."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise unreadable(f"{what} is {type(value).__name__}, not an object")
    return value


def whole_number(value) -> int | None:
    """A token id or seed a server sent; anything but a whole number counts as not sent."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def raise_error_event(event: dict) -> None:
    """Raise the BackendError an error event stands for (TGI's `{"error", "error_type"}`, the
    OpenAI shape `{"error": {"message", ...}}` or `{"object": "error", "message"}`); None if
    `event` is no error."""
    error = event.get("error")
    if error is None and event.get("object") == "error":
        error = event.get("message") or "error"
    if error is None:
        return
    message = error.get("message", error) if isinstance(error, dict) else error
    error_type = event.get("error_type")
    raise error_for_event(error_type if isinstance(error_type, str) else None, str(message))


def parse_line(line: str) -> Token | None:
    """The token in one SSE line, None for blank/comment/non-data lines; raises a BackendError on
    error events and on events that are not what TGI sends."""
    event = sse_event(line)
    if event is None:
        return None
    raise_error_event(event)
    token = object_field(event.get("token"), "a token")
    details = object_field(event.get("details"), "the details")
    return make_token(
        text_field(token.get("text"), "a token's text"),
        whole_number(token.get("id")),
        token.get("special") is True,
        text_field(details.get("finish_reason"), "the finish reason") or None,
        whole_number(details.get("seed")),
    )


def make_token(text: str, token_id, special: bool, finish_reason: str | None, seed) -> Token:
    """Our Token for one TGI token; special tokens (the end-of-text token) show no text."""
    return Token(
        "" if special else (text or ""),
        id=token_id,
        finish_reason=FINISH_REASONS.get(finish_reason, FINISH_STOP) if finish_reason else None,
        seed=seed,
    )
