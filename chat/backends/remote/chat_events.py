"""The OpenAI-style streams (`/v1/chat/completions` and `/v1/completions`), as `Token`s.

The chat route is used where a server applies the model's chat template itself (`--prompt-format
template`): TGI's Messages API speaks it, as do vLLM, SGLang and `transformers serve`; the
completions route takes our own Falcon prompt. Server-sent events, one JSON chunk per `data:`
line: `{"choices": [{"delta": {"content": "..."}, "finish_reason": null}]}` on the chat route,
`{"choices": [{"text": "...", "finish_reason": null}]}` on the completions route, the last chunk
with a `finish_reason`, then `data: [DONE]`. Errors arrive inside the stream as TGI's
`{"error", "error_type"}` or OpenAI's `{"error": {"message", ...}}`. Lines are read by
`tgi_events` (`sse_event`, `tokens_from_lines`), with the same checks on what a server sends.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from chat.backends.remote.tgi_events import (
    object_field,
    raise_error_event,
    sse_event,
    text_field,
    tokens_from_lines,
    unreadable,
)
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
        # Continue: TGI (3.0.1 on, huggingface/text-generation-inference#2733) resumes the last
        # message instead of starting a new one after it.
        "continue_final_message": True if messages.continues_reply else None,
    }
    return {name: value for name, value in body.items() if value is not None}


def _first_choice(line: str, text_of) -> Token | None:
    """The token in the first choice of one chunk (`text_of(choice)` finds its text); None for a
    line that carries none."""
    event = sse_event(line)
    if event is None:
        return None
    raise_error_event(event)
    choices = event.get("choices") or []
    if not isinstance(choices, list):
        raise unreadable("`choices` is not a list")
    for choice in choices[:1]:
        choice = object_field(choice, "a choice")
        finish = text_field(choice.get("finish_reason"), "the finish reason")
        return Token(
            text_of(choice),
            finish_reason=(FINISH_LENGTH if finish == "length" else FINISH_STOP) if finish else None,
        )
    return None


def parse_chat_line(line: str) -> Token | None:
    """The token in one SSE line of a chat stream; None for anything that carries none."""
    return _first_choice(
        line,
        lambda choice: text_field(
            object_field(choice.get("delta"), "a delta").get("content"), "a token's text"
        ),
    )


def parse_completion_line(line: str) -> Token | None:
    """The token in one SSE line of a completions stream; None for anything that carries none."""
    return _first_choice(line, lambda choice: text_field(choice.get("text"), "a token's text"))


def tokens_from_chat_lines(lines: Iterable[str]) -> Iterator[Token]:
    """The tokens of one chat stream; GenerationFailed if it ends before a chunk with a
    `finish_reason` (cut off, not finished)."""
    return tokens_from_lines(lines, parse_chat_line, final_event="a finish_reason")


def tokens_from_completion_lines(lines: Iterable[str]) -> Iterator[Token]:
    """The tokens of one completions stream; as `tokens_from_chat_lines`."""
    return tokens_from_lines(lines, parse_completion_line, final_event="a finish_reason")
