"""The backend protocol every source of tokens implements.

`stream(prompt, params)` returns a generator of `Token`s. Closing that generator is cancelling:
its `finally:` must stop the generation (set the worker's stop event, close the HTTP response),
because that is all Gradio's Stop button, a closed tab or a cancelled API call can do.
Failures are raised as `chat.conversation.errors.BackendError` subclasses, never as library exceptions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Generator
from dataclasses import dataclass

from chat.conversation.params import GenerationParams
from chat.conversation.prompt import FalconFormat, Prompt, PromptFormat

# Why a generation ended, as reported by the backend's last token.
FINISH_STOP = "stop"  # end of turn: end-of-text token or a stop sequence
FINISH_LENGTH = "length"  # max_new_tokens reached
FINISH_CANCELLED = "cancelled"


@dataclass(frozen=True)
class Token:
    """A piece of generated text. The last one may carry only a `finish_reason`."""

    text: str
    id: int | None = None
    finish_reason: str | None = None
    seed: int | None = None  # the seed used, where the backend reports it (on the last token)
    # (proposed, accepted) draft tokens, where the backend decoded speculatively (the last token)
    speculation: tuple[int, int] | None = None


class Backend(ABC):
    """A source of tokens for one model."""

    #: How this backend is named on the page and in logs, e.g. "local transformers (cpu)".
    name: str = "backend"
    #: The model's name as shown to the user.
    model_name: str = "model"
    #: How many generations may run at once; the UI's queue allows that many.
    concurrency_limit: int = 1
    #: A sentence the page (under the model's name) and the start-up log add about this model,
    #: e.g. that it is a small default and how to switch to Falcon; "" for none.
    notice: str = ""
    #: How a conversation is written for this model; `stream` and `count_tokens` take what its
    #: `render` returns (text, or `ChatMessages` for a server's chat route).
    prompt_format: PromptFormat = FalconFormat()

    @abstractmethod
    def context_length(self) -> int:
        """Tokens the model can attend to: prompt plus reply."""

    def max_input_tokens(self) -> int | None:
        """The server's own limit on a prompt's tokens where it is below the context (TGI's
        `max_input_tokens`), else None. Prompts are fitted to it, so no request is refused for it."""
        return None

    @abstractmethod
    def count_tokens(self, text: Prompt) -> int:
        """Tokens `text` takes as a prompt, counted the way the model will count them."""

    @abstractmethod
    def stream(self, prompt: Prompt, params: GenerationParams) -> Generator[Token, None, None]:
        """Generate a continuation of `prompt`; closing the generator cancels the generation."""

    def healthy(self) -> bool:
        """Whether the backend can serve a request now (model loaded, server reachable)."""
        return True

    def close(self) -> None:  # noqa: B027 (optional hook: most backends hold nothing)
        """Release the model or connections."""
