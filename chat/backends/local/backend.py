"""Local backend: a model in this process (an `Engine`, assembled by chat/engine/build.py).

One long-lived worker thread owns the model and runs one generation at a time from a job queue.
Owning the model from one thread is what a CUDA-graph decode path needs (graphs and their memory
pools are per thread), and it makes "one generation at a time per model" a property of the
design rather than of a lock. The decode loop itself sits behind the engine's `Decoder`
(engine/decoders.py), so plain `generate`, the fast decoder, int4 and tensor parallelism all
stream, cancel and fail through the code here.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

from chat.conversation.backend import Backend, Token
from chat.conversation.errors import BackendTimeout, GenerationFailed
from chat.conversation.params import GenerationParams
from chat.engine.build import Engine

log = logging.getLogger(__name__)

# How long a reader waits for the next token before calling the generation stuck.
TOKEN_TIMEOUT_S = 120.0


@dataclass
class _Job:
    input_ids: object
    params: GenerationParams
    seed: int
    out: queue.Queue = field(default_factory=queue.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Task:
    """Work other than a generation that must run on the worker thread (warm-up, benchmarks)."""

    run: Callable[[], object]
    done: threading.Event = field(default_factory=threading.Event)
    result: object = None
    error: BaseException | None = None


_END = object()


class LocalBackend(Backend):
    """Streams from an `Engine`; see the module docstring."""

    def __init__(self, engine: Engine, *, model_name: str, prompt_format=None):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.name = engine.description
        if prompt_format is not None:
            self.prompt_format = prompt_format
        self.concurrency_limit = 1
        self._jobs: queue.Queue[_Job | _Task | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="local-decoder", daemon=True)
        self._worker.start()
        # CUDA graphs belong to the thread that captures them: the worker, which replays them.
        # Start-up waits for it, so no user's request pays for compiling.
        self.call_on_worker(engine.warm_up)

    @property
    def decoder(self):
        return self.engine.decoder

    # -- the protocol --------------------------------------------------------------------------

    def context_length(self) -> int:
        return self.engine.context_length

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text))

    def stream(self, prompt: str, params: GenerationParams) -> Generator[Token, None, None]:
        import torch
        from tokenizers.decoders import DecodeStream

        seed = params.seed if params.seed is not None else random.randrange(2**31)
        job = _Job(torch.tensor([self._encode(prompt)]), params, seed)
        self._jobs.put(job)
        # Per-token decoding that holds back only an incomplete UTF-8 sequence: the page (and
        # Stop) stay within one token of the model, even for text without spaces.
        detokenizer = DecodeStream(skip_special_tokens=True)
        try:
            while True:
                try:
                    item = job.out.get(timeout=TOKEN_TIMEOUT_S)
                except queue.Empty:
                    raise BackendTimeout(detail="local model produced no token in time") from None
                if isinstance(item, tuple):  # (_END, finish_reason, speculation figures or None)
                    yield Token("", finish_reason=item[1], seed=seed, speculation=item[2])
                    return
                if isinstance(item, BaseException):
                    raise GenerationFailed(detail=f"{type(item).__name__}: {item}") from item
                text = detokenizer.step(self._raw_tokenizer, item)
                yield Token(text or "", id=item)
        finally:
            job.cancel.set()

    def call_on_worker(self, function: Callable[[], object]) -> object:
        """Run `function()` on the thread that owns the model and its CUDA graphs; return its result."""
        task = _Task(function)
        self._jobs.put(task)
        task.done.wait()
        if task.error is not None:
            raise task.error
        return task.result

    def healthy(self) -> bool:
        decoder_healthy = getattr(self.decoder, "healthy", None)  # a tensor-parallel rank may die
        return self._worker.is_alive() and (decoder_healthy is None or decoder_healthy())

    def close(self) -> None:
        self._jobs.put(None)
        if hasattr(self.decoder, "close") and threading.current_thread() is not self._worker:
            # The decoder's processes end on the worker thread; a process exiting meanwhile
            # would cut that short (tensor-parallel ranks left without their group's teardown).
            self._worker.join(timeout=30)

    # -- the worker ------------------------------------------------------------------------------

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if isinstance(job, _Task):
                try:
                    job.result = job.run()
                except BaseException as error:
                    job.error = error
                finally:
                    job.done.set()
                continue
            if job.cancel.is_set():
                continue
            try:
                reason = self.decoder.generate(
                    job.input_ids, job.params, job.seed, job.out.put, job.cancel.is_set
                )
                job.out.put((_END, reason, _speculation(self.decoder)))
            except BaseException as error:  # reaches the reader as a clear message, never a hang
                log.exception("generation failed")
                job.out.put(error)
        close = getattr(self.decoder, "close", None)
        if close is not None:  # on this thread: it may still be generating until the queue ends
            close()

    @property
    def _raw_tokenizer(self):
        return self.tokenizer._tokenizer if hasattr(self.tokenizer, "_tokenizer") else self.tokenizer

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]


def _speculation(decoder) -> tuple[int, int] | None:
    """(proposed, accepted) of the decoder's last reply, where it decoded speculatively."""
    stats = getattr(decoder, "speculation", None)
    return None if stats is None else (stats.proposed, stats.accepted)
