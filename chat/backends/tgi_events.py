"""TGI's stream events, as `Token`s: the one place that knows their shape.

TGI (and SageMaker's Hugging Face LLM containers, which run TGI) send server-sent events, one JSON
object per `data:` line (`data:{...}` from older routers, `data: {...}` from newer ones), blank
lines between events, `:` comment lines as keep-alives, and no `[DONE]`. Each event carries one
token; the last one also carries `generated_text` and `details.finish_reason`. An error arrives as
an event `{"error": "...", "error_type": "validation" | "overloaded" | "generation" | ...}` inside a
stream that started with HTTP 200.

The TGI backend gets whole lines from httpx and parses each with `parse_line`; SageMaker's event
stream hands us raw bytes split anywhere, so `LineBuffer` rebuilds the lines first.
"""

from __future__ import annotations

import json

from ..errors import GenerationFailed
from .base import FINISH_LENGTH, FINISH_STOP, Token
from .failover import error_for_event

# TGI's finish reasons -> ours. The matched stop sequence stays in TGI's text; our stop filter
# cuts it, so "stop_sequence" is just the end of the turn.
FINISH_REASONS = {"length": FINISH_LENGTH, "eos_token": FINISH_STOP, "stop_sequence": FINISH_STOP}


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


def parse_line(line: str) -> Token | None:
    """The token in one SSE line, None for blank/comment/non-data lines; raises a BackendError on
    error events and on events that are not JSON."""
    if not line.startswith("data:"):
        return None
    payload = line[len("data:") :].strip()
    if not payload or payload == "[DONE]":
        return None
    try:
        event = json.loads(payload)
    except ValueError:  # a cut or garbled event: nothing after it can be trusted
        raise GenerationFailed(
            "The connection to the model server broke off. Please try again.",
            detail=f"unreadable event: {payload[:200]}",
        ) from None
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
