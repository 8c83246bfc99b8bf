"""Browser fixtures: headless Chromium (Debian's build, driven by Playwright), the app on a recording
tiny model, on a failing backend and on a scripted model (wide code, tables, math, a long reply) seen
at desktop and phone sizes, and a static server for the playground page.

Pages share a browser context per size (Gradio's scripts load once); each test's pages clear their
storage when the test ends, so saved chat history never leaks between tests. Screenshots go to
tests/screenshots/ (ignored by git).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import re
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from chat.config import Settings
from chat.conversation.backend import Backend, Token
from chat.conversation.errors import BackendUnavailable
from tests.browser.chat_page import ChatPage
from tests.doubles import FailingBackend, RecordingDecoder
from tests.helpers import INSTALL_CHROMIUM, free_port, serve_app

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
            f"{CHROMIUM} not found: {INSTALL_CHROMIUM} (or deselect these tests with -m 'not browser')"
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
        close_with_storage_cleared(page)


def close_with_storage_cleared(page) -> None:
    """Clear the site's storage, then close: no saved chat or settings leak into the next test.
    Leave the app first (for /healthz: same origin, no scripts): a settings write still on its
    way back from the server would otherwise land after the clear and be restored into the next
    test's page over what that test types."""
    with contextlib.suppress(Exception):
        if page.url.startswith("http"):
            parts = urlsplit(page.url)
            page.goto(f"{parts.scheme}://{parts.netloc}/healthz")
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
    from chat.backends.local.backend import LocalBackend
    from chat.backends.local.model_source import tiny_model_notice
    from chat.engine.build import Engine

    recorder = RecordingDecoder(local_backend.decoder, local_backend.tokenizer)
    engine = Engine.of_model(
        local_backend.engine.model,
        local_backend.tokenizer,
        context_length=local_backend.context_length(),
        decoder=recorder,
    )
    # named and described as `python app.py` does where SmolLM2's package is missing
    backend = LocalBackend(engine, model_name="tiny demo Falcon (random weights)")
    backend.notice = tiny_model_notice()
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


# The page at the sizes people use it: a laptop, and a phone held upright.
SIZES = {"desktop": {"width": 1366, "height": 900}, "phone": {"width": 390, "height": 844}}
WIDE_CODE_LINE = "print(" + ", ".join(f"'value_{n:03d}'" for n in range(16)) + ")"  # ~200 characters
# What the scripted model answers when the newest message contains the key.
SCRIPT = {
    "code and a table": (
        "Here is the code:\n\n```python\n" + WIDE_CODE_LINE + "\n```\n\nAnd the table:\n\n"
        "| name | date | amount | currency | paid by | note |\n|---|---|---|---|---|---|\n"
        + "| Alice Wonderland | 1 September 2026 | 120.00 | EUR | bank transfer | first instalment |\n"
        * 3
    ),
    "math": "Between $5 and $10. The area is $\\pi r^2$, and \\(a^2 + b^2 = c^2\\).",
    "keep talking": "and on " * 1500,
    "slowly": "word after word " * 100,
    "indented code": "Start the total first:\n\n    total = 0\n    for n in numbers:\n        total += n",
    "think first": "Thought it through.",
    # Longer than the view at once, then on steadily: a reply to scroll in while it streams (a
    # line every two words, so that it grows as fast at every width).
    "long and steady": "and on\n" * 2000,
}
SLOW_WORD_S = 0.8  # the "slowly" reply's pace after its first words: it ends this long after Stop
THINK_S = 2.0  # how long the "think first" reply waits for its first word (a slow server's start)
# The "long and steady" reply: its first 100 lines at once, then 10 a second (for minutes, until
# stopped): few page updates, so a loaded machine keeps up, and still growing when a test gets there.
STEADY_AFTER_WORDS, STEADY_WORD_S = 200, 0.05
MAX_MESSAGE_CHARS = 200


SERVER_DOWN = "server down"  # a newest message with this is answered as by a server that is down
SERVER_BACK = "server back"  # ...and with this, as by one that is down the first time, then back


class ScriptedBackend(Backend):
    """Stands in for a model that writes what a page test needs (a wide code block and table,
    math, a reply long enough to stop, one slow to end after Stop, one slow to start), word by
    word at `words_per_s`;
    closing the stream (Stop) ends it after the word in hand; a prompt that ends inside a reply
    (Continue) is answered with the rest of that reply; and for a server that cannot be
    reached (SERVER_DOWN; SERVER_BACK: only the first time a prompt is sent), failing as a remote
    backend does. It records the prompts it was given."""

    name = "scripted test backend"
    model_name = "/models/falcon-7b-instruct"  # a local folder: the page names it by its own name
    concurrency_limit = 4

    def __init__(self, words_per_s: float = 200):
        self.words_per_s = words_per_s
        self.prompts: list[str] = []

    def context_length(self) -> int:
        return 4096

    def count_tokens(self, text: str) -> int:
        return len(text.split()) + 1

    def stream(self, prompt, params):
        self.prompts.append(prompt)
        message = prompt.rsplit("User:", 1)[-1]
        if SERVER_DOWN in message or (SERVER_BACK in message and self.prompts.count(prompt) == 1):
            raise BackendUnavailable(detail="scripted: connection refused")
        reply = next((text for key, text in SCRIPT.items() if key in message), "A short reply.")
        pieces = re.findall(r"\S+\s*|\s+", reply)
        said = "" if prompt.endswith("Falcon:") else prompt.rsplit("\nFalcon: ", 1)[-1]
        if said:  # Continue: the prompt ends inside the reply; the model goes on from there
            pieces = re.findall(r"\s*\S+|\s+", reply[len(said) :] if reply.startswith(said) else "")
        for index, word in enumerate(pieces):
            if index >= params.max_new_tokens:
                yield Token("", finish_reason="length")
                return
            if reply is SCRIPT["think first"] and index == 0:
                time.sleep(THINK_S)
            time.sleep(self.pause(reply, index))
            yield Token(word, id=index)
        yield Token("", finish_reason="stop")

    def pause(self, reply: str, index: int) -> float:
        """Seconds before the word at `index` of `reply`."""
        if reply is SCRIPT["slowly"] and index > 2:
            return SLOW_WORD_S
        if reply is SCRIPT["long and steady"]:
            return STEADY_WORD_S if index >= STEADY_AFTER_WORDS else 0.0
        return 1 / self.words_per_s


@pytest.fixture(scope="package")
def scripted_backend():
    return ScriptedBackend()


@pytest.fixture(scope="package")
def scripted_url(scripted_backend):
    with serve_app(scripted_backend, Settings(max_message_chars=MAX_MESSAGE_CHARS)) as url:
        yield url


@pytest.fixture(scope="package")
def sized_contexts(browser):
    """One browser context per size, made when first asked for."""
    contexts = {}

    def context(size: str, theme: str = "light"):
        if (size, theme) not in contexts:
            made = browser.new_context(viewport=SIZES[size], color_scheme=theme)
            made.set_default_timeout(TIMEOUT_MS)
            contexts[size, theme] = made
        return contexts[size, theme]

    yield context
    for made in contexts.values():
        made.close()


@pytest.fixture
def open_scripted(sized_contexts, scripted_url):
    """Open the chat on the scripted model at a size (and theme); storage is cleared afterwards."""
    pages = []

    def open_chat(size: str = "desktop", theme: str = "light") -> ChatPage:
        page = sized_contexts(size, theme).new_page()
        pages.append(page)
        return ChatPage(page, scripted_url).open(f"?__theme={theme}")

    yield open_chat
    for page in pages:
        close_with_storage_cleared(page)
