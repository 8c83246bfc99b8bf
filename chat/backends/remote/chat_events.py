"""The chat-completions stream (`POST /v1/chat/completions`, OpenAI's shape), as `Token`s.

Used where a server applies the model's chat template itself (`--prompt-format template`): TGI's
Messages API speaks it, as do vLLM, SGLang and `transformers serve` (the OpenAI backend reads them
through the `openai` package instead). Server-sent events, one JSON chunk per `data:` line:
`{"choices": [{"delta": {"content": "..."}, "finish_reason": null}]}`, the last chunk with a
`finish_reason`, then `data: [DONE]`. TGI reports errors inside the stream as in its own route
(`{"error", "error_type"}`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from chat.backends.remote.failover import error_for_event
from chat.backends.remote.tgi_events import sse_event, tokens_from_lines
from chat.conversation.backend import FINISH_LENGTH, FINISH_STOP, Token
from chat.conversation.params import GenerationParams
from chat.conversation.prompt import ChatMessages

CHAT_MAX_STOP_SEQUENCES = 4  # OpenAI's limit, and TGI's default; our stop filter applies them all


def chat_request(messages: ChatMessages, params: GenerationParams, model: str = "tgi") -> dict:
    """The body of a streaming chat request; temperature 0 is greedy on TGI and vLLM alike."""
    body = {
        "model": model,
        "messages": messages.as_dicts(),
        "stream": True,
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p if params.top_p < 1.0 and not params.greedy else None,
        "seed": params.seed,
        "stop": list(params.stop_sequences[:CHAT_MAX_STOP_SEQUENCES]) or None,
    }
    return {name: value for name, value in body.items() if value is not None}


def parse_chat_line(line: str) -> Token | None:
    """The token in one SSE line of a chat stream; None for anything that carries none."""
    event = sse_event(line)
    if event is None:
        return None
    if event.get("error") is not None:
        error = event["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
        raise error_for_event(event.get("error_type"), str(message))
    for choice in (event.get("choices") or [])[:1]:
        text = (choice.get("delta") or {}).get("content") or ""
        finish = choice.get("finish_reason")
        return Token(
            text, finish_reason=(FINISH_LENGTH if finish == "length" else FINISH_STOP) if finish else None
        )
    return None


def tokens_from_chat_lines(lines: Iterable[str]) -> Iterator[Token]:
    """The tokens of one chat stream; GenerationFailed if it ends before a chunk with a
    `finish_reason` (cut off, not finished)."""
    return tokens_from_lines(lines, parse_chat_line, final_event="a finish_reason")
