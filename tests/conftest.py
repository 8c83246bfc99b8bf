"""Shared fixtures: the tiny offline Falcon, a local backend on it, and the app served on loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import free_port, serve_app

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from chat.tiny_model import ensure_tiny_model

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
