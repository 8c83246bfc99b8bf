"""Errors by kind, each carrying the one sentence a user is shown.

Backends and validation raise these; the reply loop turns them into chat messages in one place
(`chat.conversation.reply`). Nothing else formats an error for the page, so raw server text and tracebacks
never reach it.
"""

from __future__ import annotations

from chat.conversation.log_safety import log_text


class ChatError(Exception):
    """Base class: `user_message` is safe to show on the page and in the API."""

    user_message = "Something went wrong while generating the reply. Please try again."

    def __init__(self, user_message: str | None = None, *, detail: str = ""):
        self.user_message = user_message or type(self).user_message
        # `detail` is for the log, never shown to the user: often a server's own words, so its
        # secrets are scrubbed and its line breaks escaped here, once for every error.
        self.detail = log_text(detail)
        super().__init__(self.user_message if not detail else f"{self.user_message} ({self.detail})")


class InvalidParameter(ChatError):
    """A generation setting is out of range or of the wrong type; the message names it."""


class InvalidMessage(ChatError):
    """The message itself cannot be sent (empty, too long in characters)."""


class PromptTooLong(ChatError):
    """The current message alone does not fit the model's context."""


class ConfigError(ChatError):
    """Bad start-up configuration; reported as one line before anything starts."""


class BackendError(ChatError):
    """Base for failures of the model or the server behind it."""

    # True when the failure happened before the first token, so another endpoint may be tried.
    retryable = False


class BackendUnavailable(BackendError):
    user_message = "The model server could not be reached. Please try again in a moment."
    retryable = True


class BackendBusy(BackendError):
    user_message = "The model is busy right now. Please try again in a moment."
    retryable = True


class BackendTimeout(BackendError):
    user_message = "The model took too long to answer. Please try again."
    retryable = True


class GenerationFailed(BackendError):
    user_message = "The model failed while generating the reply. Please try again."


class ContextOverflow(BackendError):
    """The server found prompt + reply longer than its context, before the first token.

    The reply loop answers it by dropping one more old turn and asking again, so the user only
    sees it when no old turn is left to drop.
    """

    user_message = (
        "The message and the reply do not fit the model's context. "
        "Please shorten the message or lower max new tokens."
    )


class RequestRejected(BackendError):
    """The server refused the request's settings (its limits differ from this app's)."""

    user_message = (
        "The model server did not accept these generation settings. Try fewer max new tokens or other values."
    )
