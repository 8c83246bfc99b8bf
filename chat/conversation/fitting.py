"""Fitting a conversation into the model's context, whatever the prompt format.

The oldest whole turns go first; the system prompt and the new message are never cut. Each count
may be a request to the model server, and any API client can send a history of any length, so the
work per reply is bounded: only the newest `MAX_HISTORY_TURNS` turns (and no more text than the
context could hold) are considered, the whole prompt is counted once, and when it does not fit,
the number of turns to drop is found by bisection: at most ~2 + log2(turns) counts, instead of one
per turn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from chat.conversation.errors import PromptTooLong
from chat.conversation.prompt import Conversation, FalconFormat, Prompt, PromptFormat
from chat.conversation.turns import Turn

# More turns than any context holds in practice; older ones are left out without being counted.
MAX_HISTORY_TURNS = 256
# A token rarely covers more characters than this: history beyond context x this is never counted.
MAX_CHARS_PER_TOKEN = 32


@dataclass(frozen=True)
class FittedPrompt:
    """A prompt that fits the context, with what was left out to make it fit."""

    text: Prompt  # a string, or ChatMessages for a server's chat route
    prompt_tokens: int
    max_new_tokens: int  # what the context leaves for the reply, at most what was asked
    dropped_turns: int
    context_length: int


def bounded_turns(turns: Sequence[Turn], context_length: int) -> tuple[Turn, ...]:
    """The newest turns that could possibly fit: at most MAX_HISTORY_TURNS, and no more text than
    the context could hold at MAX_CHARS_PER_TOKEN characters a token."""
    kept: list[Turn] = []
    chars = 0
    for turn in reversed(turns[-MAX_HISTORY_TURNS:]):
        chars += len(turn.user) + len(turn.assistant)
        if chars > context_length * MAX_CHARS_PER_TOKEN:
            break
        kept.append(turn)
    return tuple(reversed(kept))


def fit_prompt(
    message: str,
    turns: Sequence[Turn],
    system_prompt: str,
    *,
    count_tokens: Callable[[Prompt], int],
    context_length: int,
    max_new_tokens: int,
    prompt_format: PromptFormat | None = None,
) -> FittedPrompt:
    """Drop the oldest whole turns until prompt + reply fit; never the system prompt or message.

    If even the message alone leaves less than `max_new_tokens`, the reply budget shrinks to what
    is left; if it leaves nothing, PromptTooLong names what is too long (the message or the system
    prompt) and how long it may be.
    """
    prompt_format = prompt_format or FalconFormat()
    considered = bounded_turns(turns, context_length)
    conversation = Conversation(system_prompt, considered, message)
    dropped_unseen = len(turns) - len(considered)
    budget = context_length - max_new_tokens

    def fitted(drop: int, prompt: Prompt, tokens: int) -> FittedPrompt:
        return FittedPrompt(
            text=prompt,
            prompt_tokens=tokens,
            max_new_tokens=min(max_new_tokens, context_length - tokens),
            dropped_turns=dropped_unseen + drop,
            context_length=context_length,
        )

    def measured(drop: int) -> tuple[Prompt, int]:
        prompt = prompt_format.render(conversation.without_oldest(drop))
        return prompt, count_tokens(prompt)

    prompt, tokens = measured(0)
    if tokens <= budget:
        return fitted(0, prompt, tokens)
    everything = len(considered)
    bare, bare_tokens = measured(everything) if everything else (prompt, tokens)
    if bare_tokens >= context_length:
        raise _too_long(conversation, prompt_format, count_tokens, context_length)
    if bare_tokens > budget or not everything:
        return fitted(everything, bare, bare_tokens)  # the reply gets what is left
    # Fewest turns to drop such that the prompt fits: `fits` always fits, `fails` never does.
    fails, fits, best = 0, everything, (bare, bare_tokens)
    while fits - fails > 1:
        middle = (fails + fits) // 2
        candidate = measured(middle)
        if candidate[1] <= budget:
            fits, best = middle, candidate
        else:
            fails = middle
    return fitted(fits, *best)


def _too_long(conversation, prompt_format, count_tokens, context_length: int) -> PromptTooLong:
    """Name what does not fit: the system prompt alone, or else the message."""
    system = conversation.system_prompt
    empty_message = prompt_format.render(Conversation(system, (), ""))
    frame = count_tokens(empty_message)  # the format's markers plus the system prompt
    if system and frame >= context_length - 1:
        without_system = count_tokens(prompt_format.render(Conversation("", (), "")))
        room = context_length - 1 - without_system
        return PromptTooLong(
            f"The system prompt is about {count_tokens(system):,} tokens long, but this model's "
            f"context holds {context_length:,} tokens in all: shorten it to under {max(room, 1):,} tokens."
        )
    message_tokens = count_tokens(conversation.message)
    room = context_length - 1 - frame
    return PromptTooLong(
        f"Your message is about {message_tokens:,} tokens long, but this model's context holds "
        f"{context_length:,} tokens in all: shorten it to under {max(room, 1):,} tokens"
        + (" (or shorten the system prompt)." if system else ".")
    )
