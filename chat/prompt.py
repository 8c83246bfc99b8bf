"""Falcon's chat format, and fitting a conversation into the model's context.

Falcon chat models were tuned on turns written as
`System: ...\\nUser: ...\\nFalcon: ...\\nUser: <message>\\nFalcon:`. The model only knows where a
turn starts from a role marker at the start of a line, so a marker typed inside a message would
forge a turn: such line starts get an invisible zero-width space in front of the marker.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import PromptTooLong
from .history import Turn, turns_from_history

ROLE_MARKERS = ("User:", "Falcon:", "System:")
# Python's str.splitlines() boundaries, so "a line" means the same thing to every reader.
_LINE_START = r"(?:\A|(?<=[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]))"
_FORGED_MARKER = re.compile(_LINE_START + r"(?=(?:User|Falcon|System):)")
_ZERO_WIDTH_SPACE = "\u200b"


def neutralize_role_markers(text: str) -> str:
    """Keep text from starting a line with a role marker, without visibly changing it."""
    return _FORGED_MARKER.sub(_ZERO_WIDTH_SPACE, text)


def render(message: str, turns: Sequence[Turn], system_prompt: str = "") -> str:
    """The prompt for `message` after `turns`, ending with `Falcon:` for the model to continue."""
    clean = neutralize_role_markers
    parts = [f"System: {clean(system_prompt)}\n"] if system_prompt else []
    parts += [f"User: {clean(turn.user)}\nFalcon: {clean(turn.assistant)}\n" for turn in turns]
    parts.append(f"User: {clean(message)}\nFalcon:")
    return "".join(parts)


def format_prompt(message: str, history, system_prompt: str = "") -> str:
    """Render Gradio history (messages or pairs) and the new message into Falcon's format."""
    return render(message, turns_from_history(history), system_prompt)


@dataclass(frozen=True)
class FittedPrompt:
    """A prompt that fits the context, with what was left out to make it fit."""

    text: str
    prompt_tokens: int
    max_new_tokens: int  # what the context leaves for the reply, at most what was asked
    dropped_turns: int
    context_length: int


def fit_prompt(
    message: str,
    turns: Sequence[Turn],
    system_prompt: str,
    *,
    count_tokens: Callable[[str], int],
    context_length: int,
    max_new_tokens: int,
) -> FittedPrompt:
    """Drop the oldest whole turns until prompt + reply fit; never the system prompt or message.

    If even the message alone leaves less than `max_new_tokens`, the reply budget shrinks to what
    is left; if it leaves nothing, PromptTooLong says how long the message is and what fits.
    """
    turns = list(turns)
    dropped = 0
    # Each turn's own count guides the first guess; the real count of the whole prompt decides.
    budget = context_length - max_new_tokens
    prompt = render(message, turns, system_prompt)
    tokens = count_tokens(prompt)
    if tokens > budget and turns:
        per_turn = [count_tokens(render("", [turn])) for turn in turns]
        excess = tokens - budget
        while dropped < len(turns) - 1 and excess > 0:
            excess -= per_turn[dropped]
            dropped += 1
        while True:
            prompt = render(message, turns[dropped:], system_prompt)
            tokens = count_tokens(prompt)
            if tokens <= budget or dropped == len(turns):
                break
            dropped += 1
    if tokens >= context_length:
        bare = count_tokens(render(message, [], system_prompt))
        room = context_length - 1 - (bare - count_tokens(message))
        raise PromptTooLong(
            f"Your message is about {count_tokens(message):,} tokens long, but this model's "
            f"context holds {context_length:,} tokens in all: shorten it to under {max(room, 0):,} "
            "tokens" + (" (or shorten the system prompt)." if system_prompt else ".")
        )
    return FittedPrompt(
        text=prompt,
        prompt_tokens=tokens,
        max_new_tokens=min(max_new_tokens, context_length - tokens),
        dropped_turns=dropped,
        context_length=context_length,
    )
