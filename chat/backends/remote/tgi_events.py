"""TGI's stream events, as `Token`s: the one place that knows their shape.

TGI (and SageMaker's Hugging Face LLM containers, which run TGI) send server-sent events, one JSON
object per `data:` line (`data:{...}` from older routers, `data: {...}` from newer ones), blank
lines between events, `:` comment lines as keep-alives, and no `[DONE]`. Each event carries one
token; the last one also carries `generated_text` and `details.finish_reason`. An error arrives as
an event `{"error": "...", "error_type": "validation" | "overloaded" | "generation" | ...}` inside a
stream that started with HTTP 200.

The TGI backend gets whole lines from httpx; SageMaker's event stream hands us raw bytes split
anywhere, so `LineBuffer` rebuilds the lines first. Both send `generate_request` and read the
answer with `tokens_from_lines`, so neither can drift from the other.
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
    for line in lines:
        token = parse(line)
        if token is not None:
            finished = finished or token.finish_reason is not None
            yield token
    if not finished:
        raise GenerationFailed(
            "The connection to the model server broke off. Please try again.",
            detail=f"the stream ended without {final_event}",
        )


class LineBuffer:
    """Bytes in arbitrary pieces -> complete text lines (a UTF-8 character may span pieces)."""

    def __init__(self):
        self._pending = b""

    def feed(self, chunk: bytes) -> list[str]:
        self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        # b"\n" never occurs inside a multi-byte UTF-8 character, so whole lines decode cleanly.
        return [line.rstrip(b"\r").decode("utf-8", errors="replace") for line in lines]

    def finish(self) -> list[str]:
        rest, self._pending = self._pending, b""
        return [rest.rstrip(b"\r").decode("utf-8", errors="replace")] if rest.strip() else []


def sse_event(line: str) -> dict | None:
    """The JSON event in one SSE line; None for blank, comment, non-data and `[DONE]` lines.
    GenerationFailed for an event that is not JSON (cut or garbled: nothing after it can be
    trusted). Shared by TGI's stream and the chat-completions stream (chat_events.py)."""
    if not line.startswith("data:"):
        return None
    payload = line[len("data:") :].strip()
    if not payload or payload == "[DONE]":
        return None
    try:
        return json.loads(payload)
    except ValueError:
        raise GenerationFailed(
            "The connection to the model server broke off. Please try again.",
            detail=f"unreadable event: {payload[:200]}",
        ) from None


def parse_line(line: str) -> Token | None:
    """The token in one SSE line, None for blank/comment/non-data lines; raises a BackendError on
    error events and on events that are not JSON."""
    event = sse_event(line)
    if event is None:
        return None
    if event.get("error") is not None:
        raise error_for_event(event.get("error_type"), str(event["error"]))
    token = event.get("token") or {}
    details = event.get("details") or {}
    return make_token(
        token.get("text", ""),
        token.get("id"),
        token.get("special", False),
        details.get("finish_reason"),
        details.get("seed"),
    )


def make_token(text: str, token_id, special: bool, finish_reason: str | None, seed) -> Token:
    """Our Token for one TGI token; special tokens (the end-of-text token) show no text."""
    return Token(
        "" if special else (text or ""),
        id=token_id,
        finish_reason=FINISH_REASONS.get(finish_reason, FINISH_STOP) if finish_reason else None,
        seed=seed,
    )
