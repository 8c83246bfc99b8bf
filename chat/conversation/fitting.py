"""Fitting a conversation into the model's context, whatever the prompt format.

The conversation comes first and the reply gets what is left: raising max new tokens never
costs a turn by itself. Turns go only when the conversation leaves the reply less than a floor
(`reply_floor`: 256 tokens, or what was asked if less, at most a quarter of the context), and
then the oldest whole turns go first; the system prompt and the new message are never cut. The
prompt also stays within the server's own input limit where it has one (TGI's
`max_input_tokens`), so no request is sent that the server must refuse. Each count
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
# The least room a reply keeps before older turns are dropped for it. 256 tokens (~190 words)
# hold an ordinary answer of a paragraph or two; a longer reply is cut at "length limit" (it can
# be continued) rather than making the model forget the start of the conversation. A bigger
# floor would drop turns sooner in every long chat; a smaller one would leave replies a line.
REPLY_FLOOR_TOKENS = 256
# Where a message meets the format's markers its tokens can merge differently than counted alone:
# advice about how long a message may be keeps this margin, so the number it names works.
ADVICE_MARGIN_TOKENS = 2


@dataclass(frozen=True)
class FittedPrompt:
    """A prompt that fits the context, with what was left out to make it fit."""

    text: Prompt  # a string, or ChatMessages for a server's chat route
    prompt_tokens: int
    max_new_tokens: int  # what the context leaves for the reply, at most what was asked
    dropped_turns: int
    context_length: int


def reply_floor(max_new_tokens: int, context_length: int) -> int:
    """The room a reply keeps before turns are dropped for it (see REPLY_FLOOR_TOKENS): never more
    than was asked, nor than a quarter of a small context."""
    return max(1, min(max_new_tokens, REPLY_FLOOR_TOKENS, context_length // 4))


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
    max_input_tokens: int | None = None,
    reply_start: str = "",
) -> FittedPrompt:
    """Keep the newest turns that leave the reply its floor; the reply gets the rest, up to
    `max_new_tokens`. Never cut the system prompt or the message.

    `max_input_tokens`: the server's limit on the prompt alone, where it has one. A message that
    fits but leaves less than the floor is sent with a shorter reply; one that does not fit at all
    raises PromptTooLong, naming what is too long and a length that leaves the reply its floor.
    `reply_start` (a reply to continue) is kept as the message is.
    """
    prompt_format = prompt_format or FalconFormat()
    considered = bounded_turns(turns, context_length)
    conversation = Conversation(system_prompt, considered, message, reply_start)
    dropped_unseen = len(turns) - len(considered)
    input_limit = prompt_limit(context_length, max_input_tokens)
    budget = min(input_limit, context_length - reply_floor(max_new_tokens, context_length))

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
    if bare_tokens > input_limit:
        raise _too_long(conversation, prompt_format, count_tokens, context_length, budget, max_input_tokens)
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


def prompt_limit(context_length: int, max_input_tokens: int | None = None) -> int:
    """The most tokens a prompt may take: the context less one for the reply, and no more than the
    server's own input limit."""
    limit = context_length - 1
    return min(limit, max_input_tokens) if max_input_tokens else limit


def _too_long(
    conversation, prompt_format, count_tokens, context_length: int, budget: int, max_input_tokens: int | None
) -> PromptTooLong:
    """Name what does not fit, the system prompt alone or else the message, and a length that
    would leave the reply its floor (`budget` is the most the prompt may take for that); or say
    that no message can fit, where the format's own markers fill the limit."""
    limit = _limit_words(budget, context_length, max_input_tokens)
    server_bound = bool(max_input_tokens) and budget == max_input_tokens
    message_tokens = count_tokens(conversation.message)
    bare = count_tokens(prompt_format.render(Conversation("", (), "")))  # the format's markers
    if budget - ADVICE_MARGIN_TOKENS - bare < 1:
        raise_to = "the server takes more" if server_bound else "the context is larger (--max-total-tokens)"
        return PromptTooLong(
            f"Your message is about {message_tokens:,} tokens long, but {limit}, which the "
            f"conversation's format alone fills: no message fits until {raise_to}."
        )
    system = conversation.system_prompt
    frame = count_tokens(prompt_format.render(Conversation(system, (), "")))  # markers + system prompt
    if system and budget - ADVICE_MARGIN_TOKENS - frame < 1:
        room = budget - ADVICE_MARGIN_TOKENS - bare
        return PromptTooLong(
            f"The system prompt is about {count_tokens(system):,} tokens long, but {limit}: "
            f"shorten it to under {room:,} tokens."
        )
    room = budget - ADVICE_MARGIN_TOKENS - frame
    return PromptTooLong(
        f"Your message is about {message_tokens:,} tokens long, but {limit}: shorten it to under "
        f"{room:,} tokens" + (" (or shorten the system prompt)." if system else ".")
    )


def _limit_words(budget: int, context_length: int, max_input_tokens: int | None) -> str:
    """Which limit binds: the server's input limit, or the context shared with the reply."""
    if max_input_tokens and budget == max_input_tokens:
        return f"the model server takes prompts of at most {max_input_tokens:,} tokens"
    return f"this model's context holds {context_length:,} tokens in all, the reply included"
