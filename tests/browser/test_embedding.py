"""The chat inside other people's pages: the playground (assets/playground.html) served from one
loopback origin, http://localhost:H, framing the app at another, http://127.0.0.1:P. That is
cross-site, the case real embeds are in: Chromium denies such a frame all storage."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from chat.config import Settings
from tests.browser.chat_page import ChatPage
from tests.helpers import serve_app

pytestmark = pytest.mark.browser


def playground(port: int, app_url: str, host: str = "localhost") -> str:
    return f"http://{host}:{port}/playground.html?src={app_url}"


def test_the_playground_shows_the_app_and_the_snippets(page, assets_port, chat_url):
    page.goto(playground(assets_port, chat_url))

    expect(page.locator("#chat-frame")).to_have_attribute("src", chat_url)
    expect(page.locator("#src")).to_have_value(chat_url)
    expect(page.locator("#iframe-snippet")).to_contain_text(f'<iframe src="{chat_url}"')
    expect(page.locator("#component-snippet")).to_contain_text(f'<gradio-app src="{chat_url}"></gradio-app>')
    expect(page.locator("#component-snippet")).to_contain_text(
        "gradio.s3-us-west-2.amazonaws.com/6.31.0/gradio.js"
    )


def test_the_playground_refuses_an_address_that_is_not_http(page, assets_port):
    page.goto(f"http://localhost:{assets_port}/playground.html?src=javascript:alert(1)")

    expect(page.locator("#address-error")).to_contain_text("Not an http(s) address")
    expect(page.locator("#chat-frame")).to_have_attribute("src", "http://127.0.0.1:7860/")


def test_a_message_sent_in_a_cross_site_frame_streams_a_reply(
    page, assets_port, chat_url, recording_backend, screenshots, real_model_pace
):
    responses = []
    page.on("response", lambda response: responses.append(response) if response.url == chat_url else None)
    page.goto(playground(assets_port, chat_url))
    expect(page.frame_locator("#chat-frame").get_by_role("button", name="Select example 1")).to_be_visible()
    # The page object works on the frame as on a page.
    frame = page.frame(url=lambda url: url.startswith(chat_url))
    chat = ChatPage(frame, chat_url, recorder=recording_backend.recorder)
    chat.open_settings()
    chat.set_number("Temperature", 0)
    chat.set_number("Max new tokens", 40)
    chat.watch_reply_growth()
    started = chat.recorder.count()

    reply = chat.ask("Hello from another site")

    expect(chat.user_messages).to_have_attribute("aria-label", "user's message: Hello from another site")
    generation = chat.recorder.ended_generation(started)
    assert "User: Hello from another site\nFalcon:" in generation.prompt
    assert generation.tokens == 40 and reply
    lengths = chat.reply_lengths()
    assert len(lengths) >= 3 and lengths == sorted(lengths), lengths  # it streamed in
    page.screenshot(path=str(screenshots / "playground.png"), full_page=True)
    # The app sent nothing that forbids framing...
    headers = responses[0].all_headers()
    assert "x-frame-options" not in headers
    assert "frame-ancestors" not in headers.get("content-security-policy", "")
    # ...and the browser denied the frame its storage, so the in-memory fallback carried the chat.
    assert frame.evaluate("() => window.falconChatMemoryStorage === true")
    # The settings are kept there too (chat.web.page.SETTINGS_STORAGE_KEY), as on a page with storage.
    keys = frame.evaluate("() => Array.from({length: localStorage.length}, (_, i) => localStorage.key(i))")
    assert any("falcon-chat-settings" in key for key in keys), keys


@pytest.fixture(scope="module")
def app_for_localhost_pages(recording_backend, assets_port):
    """The app, framable only by the playground's origin http://localhost:H."""
    settings = Settings(allow_embed_from=(f"http://localhost:{assets_port}",))
    with serve_app(recording_backend, settings) as url:
        yield url


def test_an_allowed_origin_may_frame_a_restricted_app(page, assets_port, app_for_localhost_pages):
    page.goto(playground(assets_port, app_for_localhost_pages))

    frame = page.frame_locator("#chat-frame")
    expect(frame.get_by_role("button", name="Select example 1")).to_be_visible()


def test_another_origin_is_refused_by_a_restricted_app(page, assets_port, app_for_localhost_pages):
    # The same playground from http://127.0.0.1:H: another origin than the one allowed.
    refusals = []
    page.on(
        "console",
        lambda message: refusals.append(message.text) if "frame-ancestors" in message.text else None,
    )
    with (
        page.expect_response(app_for_localhost_pages) as response_info,
        page.expect_console_message(lambda message: "frame-ancestors" in message.text),
    ):
        page.goto(playground(assets_port, app_for_localhost_pages, host="127.0.0.1"))

    policy = response_info.value.all_headers()["content-security-policy"]
    assert f"frame-ancestors 'self' http://localhost:{assets_port}" in policy.split("; ")
    assert re.search(r"frame-ancestors .*blocked", refusals[0], re.DOTALL), refusals
    # The frame never gets the app.
    frame = next(f for f in page.frames if f is not page.main_frame)
    assert frame.evaluate("() => document.querySelector('gradio-app, .gradio-container') === null")
