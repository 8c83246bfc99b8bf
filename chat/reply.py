"""One reply, from the user's message to the text on the page.

message + history -> `fit_prompt` -> backend token stream -> `StopFilter` -> growing text.
Request errors (bad message, bad settings, prompt too long) are raised as `ChatError` before
anything streams; failures of the backend become a note under whatever part of the reply arrived,
so a partial reply stays visible and the conversation goes on.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

from .backends.base import Backend
from .errors import BackendError, InvalidMessage
from .history import add_note, turns_from_history
from .params import GenerationParams
from .prompt import fit_prompt
from .stops import StopFilter

log = logging.getLogger(__name__)

# Control characters other than tab and line breaks: invisible, and NUL breaks some servers.
_CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
EMPTY_REPLY_NOTE = "The model ended its turn without writing anything. Try again or rephrase."


def clean_message(message, max_chars: int) -> str:
    """The message as it will be sent, or InvalidMessage saying what is wrong with it."""
    if not isinstance(message, str):
        raise InvalidMessage("The message must be text.")
    message = _CONTROL_CHARACTERS.sub("", message)
    if not message.strip():
        raise InvalidMessage("Please type a message first.")
    if len(message) > max_chars:
        raise InvalidMessage(
            f"The message is {len(message):,} characters long; the limit is {max_chars:,}. "
            "Please shorten it."
        )
    return message


def stream_reply(
    backend: Backend,
    message: str,
    history,
    system_prompt: str,
    params: GenerationParams,
    *,
    max_message_chars: int,
) -> Iterator[str]:
    """Yield the growing reply text. Closing this generator stops the backend's generation."""
    message = clean_message(message, max_message_chars)
    system_prompt = _CONTROL_CHARACTERS.sub("", system_prompt or "").strip()
    fitted = fit_prompt(
        message,
        turns_from_history(history),
        system_prompt,
        count_tokens=backend.count_tokens,
        context_length=backend.context_length(),
        max_new_tokens=params.max_new_tokens,
    )
    params = params.with_max_new_tokens(fitted.max_new_tokens)
    stop_filter = StopFilter(params.stop_sequences)
    tokens = backend.stream(fitted.text, params)
    try:
        for token in tokens:
            if stop_filter.push(token.text):
                yield stop_filter.text
            if stop_filter.stopped:
                break
        shown = stop_filter.text
        final = stop_filter.finish()
        if not final:
            yield add_note("", EMPTY_REPLY_NOTE)
        elif final != shown:
            yield final
    except BackendError as error:
        log.warning("reply failed: %s %s", type(error).__name__, error.detail)
        partial = stop_filter.text
        yield add_note(partial, f"Reply cut short: {error.user_message}" if partial else error.user_message)
    finally:
        tokens.close()
