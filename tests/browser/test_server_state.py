"""A model server that is down shows on the page as it loads, before anyone types a message; a
reload checks again. (The start-up log says it too: tests/test_startup.py.)"""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from chat.backends.remote.failover import RemoteOptions
from chat.backends.remote.tgi import TGIBackend
from chat.config import Settings
from tests.browser.chat_page import ChatPage
from tests.helpers import free_port, serve_app
from tests.tgi_double import TGIDouble

pytestmark = pytest.mark.browser


def test_a_server_that_is_down_is_shown_before_the_first_message_and_rechecked_on_reload(page):
    port = free_port()  # nothing listens here yet
    endpoint = f"http://127.0.0.1:{port}"
    backend = TGIBackend([endpoint], options=RemoteOptions(connect_timeout_s=2.0))
    state = page.locator("#server-state")
    try:
        with serve_app(backend, Settings(backend="tgi", endpoints=(endpoint,))) as url:
            chat = ChatPage(page, url).open()
            expect(state).to_have_text(
                "⚠️ The model server does not answer right now: messages will fail until it does. "
                "Reload the page to check again."
            )
            assert chat.user_messages.count() == 0
            with TGIDouble().start(port):
                chat.open()
                expect(state).to_be_hidden()
    finally:
        backend.close()
