"""Test doubles: real implementations of the app's protocols, no patches.

`RecordingDecoder` wraps the local backend's decode loop (the `Decoder` protocol) and records each
generation: the prompt the model got, its settings, the tokens it made and why it ended. It stands
in for looking inside the model worker, so a test can see that Stop ended the generation itself,
not just the text on the page. Its `tokens_per_s`, when set, holds the tiny model (hundreds of
tokens a second on a CPU) to the pace of a real one: a flood of updates keeps a loaded browser too
busy to take a click.

`FailingBackend` stands in for a model server that breaks mid-reply: it streams a few words, then
raises `GenerationFailed`, as a real backend does when its server fails.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator
from dataclasses import dataclass, field

from chat.conversation.backend import Backend, Token
from chat.conversation.errors import GenerationFailed
from chat.conversation.params import GenerationParams


@dataclass
class Generation:
    """One run of the decode loop, as the model worker saw it."""

    prompt: str
    params: GenerationParams
    input_ids: list[int] = field(default_factory=list)  # the prompt as the model got it
    seed: int | None = None
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # set when the loop has returned
    ended: threading.Event = field(default_factory=threading.Event)
    started_at: float = field(default_factory=time.monotonic)
    ended_at: float | None = None
    tokens_when_cancelled: int | None = None  # how many tokens existed when Stop first showed

    @property
    def tokens_after_cancel(self) -> int:
        """Tokens the model made after it was told to stop (the backend promises at most one)."""
        return self.tokens - self.tokens_when_cancelled if self.tokens_when_cancelled is not None else 0

    @property
    def tokens(self) -> int:
        return len(self.token_ids)


class RecordingDecoder:
    """A `Decoder` that runs `inner` and records every generation (see the module docstring)."""

    def __init__(self, inner, tokenizer):
        self.inner = inner
        self.name = f"recording {inner.name}"
        self.tokenizer = tokenizer
        self.generations: list[Generation] = []
        self.tokens_per_s: float | None = None
        self._changed = threading.Condition()

    def generate(self, input_ids, params, seed, emit, cancelled) -> str:
        ids = input_ids[0].tolist()
        generation = Generation(self.tokenizer.decode(ids), params, input_ids=ids, seed=seed)
        with self._changed:
            self.generations.append(generation)
            self._changed.notify_all()

        pace = self.tokens_per_s

        def counting_emit(token_id: int) -> None:
            generation.token_ids.append(token_id)
            if pace:  # the token is due len(token_ids) / pace seconds after the start
                time.sleep(max(0.0, generation.started_at + generation.tokens / pace - time.monotonic()))
            emit(token_id)

        def noting_cancelled() -> bool:
            if cancelled() and generation.tokens_when_cancelled is None:
                generation.tokens_when_cancelled = generation.tokens
            return cancelled()

        try:
            generation.finish_reason = self.inner.generate(
                input_ids, params, seed, counting_emit, noting_cancelled
            )
            return generation.finish_reason
        finally:
            generation.ended_at = time.monotonic()
            generation.ended.set()
            with self._changed:
                self._changed.notify_all()

    def text(self, generation: Generation) -> str:
        """What the model wrote in `generation`, decoded in one go."""
        return self.tokenizer.decode(generation.token_ids, skip_special_tokens=True)

    def count(self) -> int:
        return len(self.generations)

    def started_generation(self, index: int, timeout: float = 30.0) -> Generation:
        """The generation number `index` (0-based) once it has started; waits for it to start."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.generations) > index, timeout):
                raise AssertionError(f"generation {index} never started ({len(self.generations)} so far)")
        return self.generations[index]

    def ended_generation(self, index: int, timeout: float = 30.0) -> Generation:
        """The generation number `index` (0-based) once it has ended; waits for it to start and end."""
        generation = self.started_generation(index, timeout)
        if not generation.ended.wait(timeout):
            raise AssertionError(f"generation {index} still running after {timeout} s")
        return generation


class FailingBackend(Backend):
    """Streams `words`, then fails the way a broken model server does (see the module docstring)."""

    name = "failing test backend"
    model_name = "a model whose server breaks"

    def __init__(self, words: tuple[str, ...] = ("Partial ", "reply ")):
        self.words = words

    def context_length(self) -> int:
        return 2048

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def stream(self, prompt: str, params: GenerationParams) -> Generator[Token, None, None]:
        for word in self.words:
            yield Token(word)
        raise GenerationFailed(detail="test backend: the server went away")


class ScriptedBackend(Backend):
    """Streams a scripted reply, like a server would, and records every prompt and count asked of
    it. It stands in for a model whose answer a test must choose (which token carries a stop
    sequence, where the last event with the seed comes); counting is one token per word."""

    name = "scripted test backend"
    model_name = "a scripted model"

    def __init__(self, pieces=("Hello", " world"), *, seed_reported: int | None = 99, context: int = 2048):
        self.pieces = tuple(pieces)
        self.seed_reported = seed_reported
        self.context = context
        self.prompts: list = []
        self.params: list[GenerationParams] = []
        self.counted: list[str] = []

    def context_length(self) -> int:
        return self.context

    def count_tokens(self, text: str) -> int:
        self.counted.append(text)
        return len(text.split()) + 1

    def stream(self, prompt, params: GenerationParams) -> Generator[Token, None, None]:
        self.prompts.append(prompt)
        self.params.append(params)
        for index, piece in enumerate(self.pieces):
            yield Token(piece, id=index)
        yield Token("", finish_reason="stop", seed=self.seed_reported)
