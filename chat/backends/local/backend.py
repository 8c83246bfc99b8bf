"""Local backend: a transformers model in this process, on the CPU or across the visible GPUs.

One long-lived worker thread owns the model and runs one generation at a time from a job queue.
Owning the model from one thread is what a CUDA-graph decode path needs (graphs and their memory
pools are per thread), and it makes "one generation at a time per model" a property of the
design rather than of a lock. The decode loop itself sits behind `decoders.Decoder`, so a faster
one can replace `PlainDecoder` without touching the streaming, cancelling and error handling here.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

from chat.backends.local.decoders import Decoder, PlainDecoder, warm_up
from chat.conversation.backend import Backend, Token
from chat.conversation.errors import BackendTimeout, ConfigError, GenerationFailed
from chat.conversation.params import GenerationParams

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
    """Streams from a model loaded with transformers; see the module docstring."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        model_name: str,
        context_length: int,
        decoder=None,
        name=None,
        prompt_format=None,
    ):
        """`model` may be None where `decoder` holds the weights (tensor parallelism)."""
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self._context_length = context_length
        if prompt_format is not None:
            self.prompt_format = prompt_format
        self.decoder: Decoder = decoder or PlainDecoder(model, tokenizer)
        device = getattr(model, "device", "cpu")
        self.name = name or f"local transformers ({getattr(device, 'type', device)})"
        self.concurrency_limit = 1
        self._jobs: queue.Queue[_Job | _Task | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="local-decoder", daemon=True)
        self._worker.start()
        # CUDA graphs belong to the thread that captures them: the worker, which replays them.
        # Start-up waits for it, so no user's request pays for compiling.
        self.decoder = self.call_on_worker(lambda: warm_up(self.decoder, model, tokenizer))

    # -- the protocol --------------------------------------------------------------------------

    def context_length(self) -> int:
        return self._context_length

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
                if isinstance(item, tuple):  # (_END, finish_reason)
                    yield Token("", finish_reason=item[1], seed=seed)
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
                job.out.put((_END, reason))
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


def load_model(model_id: str, *, quantize: str | None = None, token: str | None = None):
    """Model and tokenizer: bf16 across all GPUs where there are GPUs, float32 on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kwargs: dict = {"token": token}
    if torch.cuda.is_available():
        kwargs.update(dtype=torch.bfloat16, device_map="auto")
    else:
        kwargs.update(dtype=torch.float32)
    if quantize:
        kwargs["quantization_config"] = _quantization_config(quantize)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, token=token)
        model = AutoModelForCausalLM.from_pretrained(model_id, **kwargs)
    except OSError as error:
        raise ConfigError(
            f"cannot load model {model_id!r}: not a model folder, or not reachable on the hub "
            f"({str(error).splitlines()[0][:200]})"
        ) from None
    model.eval()
    return model, tokenizer


def _quantization_config(quantize: str):
    import importlib.util

    import torch
    from transformers import BitsAndBytesConfig

    if not torch.cuda.is_available():
        raise ConfigError(f"--quantize {quantize} needs a CUDA GPU; none is visible")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"--quantize {quantize} needs bitsandbytes: pip install bitsandbytes")
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4"
    )


def model_context_length(config, tokenizer) -> int:
    """The model's context: its config, else the tokenizer's, else Falcon's 2,048."""
    length = getattr(config, "max_position_embeddings", None)
    if not length:
        length = getattr(tokenizer, "model_max_length", None)
    return int(length) if length and length < 10**7 else 2048
