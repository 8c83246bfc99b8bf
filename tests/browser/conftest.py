"""Browser fixtures: headless Chromium (Debian's build, driven by Playwright), the app on a recording
tiny model, the app on a failing backend, and a static server for the playground page.

Pages share one browser context (Gradio's scripts load once); each test's pages clear their
storage when the test ends, so saved chat history never leaks between tests. Screenshots go to tests/screenshots/ (ignored by git).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import threading
from pathlib import Path

import pytest

from tests.browser.chat_page import ChatPage
from tests.doubles import FailingBackend, RecordingDecoder
from tests.helpers import free_port, serve_app

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# What Debian's Chromium needs to run headless in a container without a GPU or network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "screenshots"
ASSETS = Path(__file__).resolve().parent.parent.parent / "assets"
TIMEOUT_MS = 20_000


# Package scope: Playwright's sync API keeps an asyncio loop running in the main thread while it
# is started, which breaks `asyncio.run` in tests outside this folder; it stops when ours are done.
@pytest.fixture(scope="package")
def browser():
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)

    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} not found: apt-get install -y chromium chromium-driver "
            "(or deselect these tests with -m 'not browser')"
        )
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="package")
def browser_context(browser):
    """One context for all the browser tests, so Gradio's scripts are fetched and compiled once."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    yield context
    context.close()


@pytest.fixture
def new_page(browser_context):
    """Make pages; at the end of the test they are closed and the sites' storage is cleared, so
    saved chat history never leaks into the next test."""
    pages = []

    def make():
        page = browser_context.new_page()
        pages.append(page)
        return page

    yield make
    for page in pages:
        with contextlib.suppress(Exception):
            if page.url.startswith("http"):
                page.evaluate("() => { localStorage.clear(); sessionStorage.clear(); }")
        page.close()


@pytest.fixture
def page(new_page):
    return new_page()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(exist_ok=True)
    return SCREENSHOTS


@pytest.fixture(scope="session")
def recording_backend(local_backend):
    """A second LocalBackend on the tiny model, its decode loop recorded."""
    from chat.backends.local import LocalBackend

    recorder = RecordingDecoder(local_backend.decoder, local_backend.tokenizer)
    backend = LocalBackend(
        local_backend.model,
        local_backend.tokenizer,
        model_name="tiny demo Falcon (random weights)",  # what `python app.py` names it
        context_length=local_backend.context_length(),
        decoder=recorder,
    )
    backend.recorder = recorder
    yield backend
    backend.close()


@pytest.fixture
def real_model_pace(recording_backend):
    """The tiny model held to 50 tokens a second, about what Falcon-7B streams on one GPU."""
    recording_backend.recorder.tokens_per_s = 50
    yield
    recording_backend.recorder.tokens_per_s = None


@pytest.fixture(scope="session")
def chat_url(recording_backend):
    with serve_app(recording_backend) as url:
        yield url


@pytest.fixture
def chat(page, chat_url, recording_backend) -> ChatPage:
    """The chat page, loaded; `chat.recorder` sees what the model worker did."""
    chat = ChatPage(page, chat_url, recorder=recording_backend.recorder)
    chat.open()
    return chat


@pytest.fixture(scope="session")
def failing_url():
    with serve_app(FailingBackend()) as url:
        yield url


@contextlib.contextmanager
def serve_folder(folder: Path):
    """Serve `folder` over http on loopback; yields the port."""

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", free_port()), functools.partial(QuietHandler, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, name="static-server", daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def assets_port():
    """The assets folder (the playground page) served on its own port."""
    with serve_folder(ASSETS) as port:
        yield port
