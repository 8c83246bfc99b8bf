"""One reply, from the user's message to the text on the page.

message + history -> `fit_prompt` -> backend token stream -> `StopFilter` -> growing text.
Request errors (bad message, bad settings, prompt too long) are raised as `ChatError` before
anything streams; failures of the backend become a note under whatever part of the reply arrived,
so a partial reply stays visible and the conversation goes on. Every reply ends with a
`ReplyStats` handed to `on_finish` (for the footer, the logs and the metrics), also when the user
stops it.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from chat.conversation import cancellation
from chat.conversation.backend import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, Backend
from chat.conversation.cancellation import Cancellation
from chat.conversation.errors import (
    BackendError,
    ContextOverflow,
    InvalidMessage,
    PromptTooLong,
    RequestRejected,
)
from chat.conversation.fitting import FittedPrompt, fit_prompt, prompt_limit
from chat.conversation.log_safety import private_texts
from chat.conversation.params import GenerationParams
from chat.conversation.stops import StopFilter
from chat.conversation.turns import Turn, add_note, turns_from_history

log = logging.getLogger(__name__)

# Control characters other than tab and line breaks: invisible, and NUL breaks some servers.
_CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
MESSAGE_NOT_TEXT = "The message must be text."
# A surrogate code point alone is no character: no encoder takes it (UTF-8, a tokenizer, a server).
_LONE_SURROGATES = re.compile("[\ud800-\udfff]")
# How each refusal names the text it is about: the chat's message, or /complete's `text`.
_FIELD_WORDS = {
    "message": ("message", "Please type a message first.", MESSAGE_NOT_TEXT),
    "text": ("text", "Please type the text to continue first.", "The text to continue must be text."),
}
EMPTY_REPLY_NOTE = "The model ended its turn without writing anything. Try again or rephrase."
NOTHING_TO_ADD_NOTE = "The model ended the reply here: it had nothing to add."
# A server that refuses to resume a reply (`transformers serve` 5.23 refuses the request outright).
CANNOT_CONTINUE_NOTE = "This model server cannot continue a reply. Retry asks it for a new one."
# Each yield costs the web server a message to the page (~5-30 ms of CPU on a small machine), so
# tokens that arrive faster than this are shown together: a fast model is not slowed to the
# page's pace, and a slow one still shows every token as it comes.
MIN_UPDATE_INTERVAL_S = 0.02
# A token the stream had to wait for longer than this is shown at once: the page is up to date. Tokens
# that were already waiting (a fast model, or this server running late) are gathered for up to
# MIN_UPDATE_INTERVAL_S after the page was last updated, so a busy server catches up in fewer updates.
WAITED_S = 0.002
# Server-side length errors answered by dropping one more turn each; after these, twice as many.
LINEAR_RETRIES = 8
FINISH_ERROR = "error"
FINISH_WORDS = {
    FINISH_STOP: "end of turn",
    FINISH_LENGTH: "length limit",
    FINISH_CANCELLED: "stopped by user",
    FINISH_ERROR: "error",
}


@dataclass
class ReplyStats:
    """Figures for one reply: shown under it, logged, counted in the metrics."""

    prompt_tokens: int = 0
    context_length: int = 0
    dropped_turns: int = 0
    generated_tokens: int = 0
    time_to_first_token_s: float | None = None
    duration_s: float = 0.0
    finish_reason: str = FINISH_CANCELLED
    seed: int | None = None
    error_kind: str | None = None
    proposed_tokens: int | None = None  # speculative decoding: tokens proposed, and accepted
    accepted_tokens: int | None = None
    # The server's words about a failure: for the request log only, never /reply_stats or the page.
    error_detail: str | None = field(default=None, repr=False)

    @property
    def tokens_per_s(self) -> float | None:
        if self.time_to_first_token_s is None or self.generated_tokens < 2:
            return None
        decoding = self.duration_s - self.time_to_first_token_s
        return (self.generated_tokens - 1) / decoding if decoding > 0 else None

    def as_dict(self) -> dict:
        figures = {k: v for k, v in asdict(self).items() if k != "error_detail"}
        return {**figures, "tokens_per_s": self.tokens_per_s}


def context_notes(stats: ReplyStats) -> list[str]:
    """Words for what the model did not see: the figures count dropped turns, but a person should
    not have to read them to learn that the model forgot the start of the conversation."""
    if not stats.dropped_turns:
        return []
    turns = "earliest turn" if stats.dropped_turns == 1 else f"{stats.dropped_turns:,} earliest turns"
    return [
        f"The model did not see the {turns}: with them the conversation would not fit its context "
        f"of {stats.context_length:,} tokens."
    ]


def clean_text(text: str) -> str:
    """`text` without control characters, a lone surrogate replaced by U+FFFD."""
    return _LONE_SURROGATES.sub("\ufffd", _CONTROL_CHARACTERS.sub("", text))


def clean_message(message, max_chars: int, *, field: str = "message") -> str:
    """The message (`field="text"`: /complete's text) as it will be sent, or InvalidMessage
    saying what is wrong with it."""
    name, empty, not_text = _FIELD_WORDS[field]
    if not isinstance(message, str):
        raise InvalidMessage(not_text)
    message = clean_text(message)
    if not message.strip():
        raise InvalidMessage(empty)
    if len(message) > max_chars:
        raise InvalidMessage(
            f"The {name} is {len(message):,} characters long; the limit is {max_chars:,}. Please shorten it."
        )
    return message


def stream_reply(
    backend: Backend,
    message: str,
    history,
    system_prompt: str | None,
    params: GenerationParams,
    *,
    max_message_chars: int,
    on_finish: Callable[[ReplyStats], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    reply_start: str = "",
) -> Iterator[str]:
    """Yield the growing reply text. Closing this generator stops the backend's generation, and so
    does `cancelled()` turning true (checked after every token, for a reader in another thread).
    With `reply_start` (Continue), the model resumes that reply: the texts are it, then what the
    model adds to it, one reply."""
    message = clean_message(message, max_message_chars)
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise InvalidMessage("The system prompt must be text.")
    system_prompt = clean_text(system_prompt or "").strip()
    if len(system_prompt) > max_message_chars:  # checked before anything counts its tokens
        raise InvalidMessage(
            f"The system prompt is {len(system_prompt):,} characters long; the limit is "
            f"{max_message_chars:,}. Please shorten it."
        )
    turns = [Turn(clean_text(t.user), clean_text(t.assistant)) for t in turns_from_history(history)]
    # The template or the prompt's end would drop trailing space; the model writes it again.
    reply_start = clean_text(reply_start).rstrip()

    def fit(drop: int) -> FittedPrompt:
        fitted = fit_prompt(
            message,
            turns[drop:],
            system_prompt,
            count_tokens=backend.count_tokens,
            context_length=backend.context_length(),
            max_new_tokens=params.max_new_tokens,
            prompt_format=backend.prompt_format,
            max_input_tokens=backend.max_input_tokens(),
            reply_start=reply_start,
        )
        return dataclasses.replace(fitted, dropped_turns=fitted.dropped_turns + drop)

    # Whatever is logged while this reply is produced (a server's error echoing its input, by us
    # or an HTTP library) withholds what repeats the conversation (chat.conversation.log_safety).
    conversation = [
        message,
        system_prompt,
        reply_start,
        *(text for turn in turns for text in (turn.user, turn.assistant)),
    ]
    with private_texts(conversation):
        yield from stream_fitted(
            backend,
            fit,
            params,
            droppable_turns=len(turns),
            on_finish=on_finish,
            cancelled=cancelled,
            reply_start=reply_start,
        )


def stream_completion(
    backend: Backend,
    text: str,
    params: GenerationParams,
    *,
    max_message_chars: int,
    on_finish: Callable[[ReplyStats], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> Iterator[str]:
    """Raw continuation of `text` (for base models): no chat format, same streaming."""
    text = clean_message(text, max_message_chars, field="text")

    def fit(drop: int) -> FittedPrompt:
        context, tokens = backend.context_length(), backend.count_tokens(text)
        limit = prompt_limit(context, backend.max_input_tokens())
        if tokens > limit:
            raise PromptTooLong(
                f"The text is about {tokens:,} tokens long, but this model takes at most {limit:,} "
                f"tokens of text to continue: shorten it to under {limit:,} tokens."
            )
        return FittedPrompt(text, tokens, min(params.max_new_tokens, context - tokens), 0, context)

    with private_texts([text]):
        yield from stream_fitted(
            backend, fit, params, on_finish=on_finish, cancelled=cancelled, keep_leading_space=True
        )


def stream_fitted(
    backend: Backend,
    fit: Callable[[int], FittedPrompt],
    params: GenerationParams,
    *,
    droppable_turns: int = 0,
    on_finish: Callable[[ReplyStats], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    keep_leading_space: bool = False,
    reply_start: str = "",
) -> Iterator[str]:
    """The shared loop: fit, stream, filter. `fit(n)` fits the prompt with at least n turns dropped.
    Each text yielded starts with `reply_start`, the reply being continued, if any."""
    started = time.perf_counter()
    if params.greedy:
        params = dataclasses.replace(params, seed=None)  # nothing is drawn: no seed to show
    elif params.seed is None:
        # Chosen here, not by the backend: a reply cut by a stop sequence never reads the
        # backend's last event, which is where servers report the seed they picked.
        params = dataclasses.replace(params, seed=random.randrange(2**31))
    stats = ReplyStats(seed=params.seed)
    # What the model adds to a reply it continues keeps its leading space: it joins the words.
    stop_filter = StopFilter(
        params.stop_sequences, keep_leading_space=keep_leading_space or bool(reply_start)
    )
    drop, overflows = 0, 0
    last_update = 0.0
    if isinstance(cancelled, Cancellation):  # lets a remote backend's blocked read be interrupted
        cancellation.current.set(cancelled)
    try:
        while True:
            fitted = fit(drop)
            stats.prompt_tokens, stats.context_length = fitted.prompt_tokens, fitted.context_length
            stats.dropped_turns = fitted.dropped_turns
            tokens = backend.stream(fitted.text, params.with_max_new_tokens(fitted.max_new_tokens))
            try:
                ended = None
                asked = time.perf_counter()
                for token in tokens:
                    waited = time.perf_counter() - asked
                    if token.finish_reason:
                        ended = token.finish_reason
                        if token.speculation:
                            stats.proposed_tokens, stats.accepted_tokens = token.speculation
                    elif token.id is not None or token.text:
                        if stats.time_to_first_token_s is None:
                            stats.time_to_first_token_s = time.perf_counter() - started
                        stats.generated_tokens += 1
                    grew = stop_filter.push(token.text)
                    since_update = time.perf_counter() - last_update
                    if grew and (waited > WAITED_S or since_update >= MIN_UPDATE_INTERVAL_S):
                        yield reply_start + stop_filter.text
                        last_update = time.perf_counter()  # when the page was ready for more
                    asked = time.perf_counter()
                    if stop_filter.stopped:
                        ended = FINISH_STOP
                        break
                    if cancelled is not None and cancelled():
                        return  # finish_reason stays FINISH_CANCELLED; `finally` stops the backend
                if cancelled is not None and cancelled():
                    return  # the stream was interrupted while waiting for a token
                stats.finish_reason = ended or FINISH_STOP
                break
            except ContextOverflow:
                # The server counts differently from us (or limits its input more than its
                # context): drop another old turn, if any is left; after a few tries 2, 4, 8...
                # more each time, so a large difference costs a few retries, not one per turn.
                if stats.generated_tokens or fitted.dropped_turns >= droppable_turns:
                    raise
                overflows += 1
                step = 1 if overflows <= LINEAR_RETRIES else 2 ** (overflows - LINEAR_RETRIES)
                drop = min(fitted.dropped_turns + step, droppable_turns)
            finally:
                tokens.close()
        final = stop_filter.finish()
        if reply_start:  # Continue: one reply, what was there and what the model added
            text, notes = reply_start + final, ([] if final.strip() else [NOTHING_TO_ADD_NOTE])
        else:
            text, notes = final, ([] if final else [EMPTY_REPLY_NOTE])
        notes += context_notes(stats)
        yield add_note(text, " ".join(notes)) if notes else text
    except BackendError as error:
        stats.finish_reason, stats.error_kind = FINISH_ERROR, type(error).__name__
        stats.error_detail = error.detail  # logged with the request (chat.web.operations), made safe there
        log.warning("reply failed: %s", type(error).__name__)
        partial = reply_start + stop_filter.text
        if reply_start and isinstance(error, RequestRejected) and not stop_filter.text:
            said = CANNOT_CONTINUE_NOTE
        else:
            said = f"Reply cut short: {error.user_message}" if partial else error.user_message
        yield add_note(partial, " ".join([said, *context_notes(stats)]))
    finally:
        stats.duration_s = time.perf_counter() - started
        if on_finish is not None:
            on_finish(stats)
