"""Reading a reply while it streams (issue #23, point 1): the view follows the reply only while the
reader is at its end. Gradio's Chatbot pulled a reader who scrolled up back to the end within
~15-60 ms (a scroll queued after every update), by wheel, scrollbar or finger alike."""

from __future__ import annotations

import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect

from tests.browser.chat_page import ChatPage
from tests.browser.conftest import SIZES, TIMEOUT_MS, close_with_storage_cleared

pytestmark = pytest.mark.browser

LONG_REPLY = "A long and steady reply, please"  # minutes of it; each test stops it when done
LOG = "#conversation .bubble-wrap"
# Where the conversation's scrolled view is: its top, how far its end is below the view, its height.
VIEW = f"""() => {{
  const log = document.querySelector("{LOG}");
  return {{ top: log.scrollTop, below: log.scrollHeight - log.scrollTop - log.clientHeight, height: log.scrollHeight }};
}}"""
GROWN_BY = f"""([height, more]) => document.querySelector("{LOG}").scrollHeight >= height + more"""
OVERFLOWING = f"""() => {{
  const log = document.querySelector("{LOG}");
  return log.scrollHeight > log.clientHeight + 450;
}}"""
# The view has stayed put for one poll, at least 300 px above the end.
SETTLED = f"""() => {{
  const log = document.querySelector("{LOG}");
  const still = window.falconTestTop === log.scrollTop;
  window.falconTestTop = log.scrollTop;
  return still && log.scrollHeight - log.scrollTop - log.clientHeight >= 300;
}}"""
AT_END = f"""() => {{
  const log = document.querySelector("{LOG}");
  return log.scrollHeight - log.scrollTop - log.clientHeight <= 8;
}}"""


@pytest.fixture
def open_touch_phone(browser, scripted_url):
    """The chat on a phone that has a touch screen (the other tests' phone has a mouse)."""
    context = browser.new_context(viewport=SIZES["phone"], has_touch=True, is_mobile=True)
    context.set_default_timeout(TIMEOUT_MS)
    pages = []

    def open_chat() -> ChatPage:
        pages.append(context.new_page())
        return ChatPage(pages[-1], scripted_url).open()

    yield open_chat
    for page in pages:
        close_with_storage_cleared(page)
    context.close()


def scroll_up(chat: ChatPage, how: str, pixels: int = 400) -> None:
    """Scroll the conversation up by `pixels`, as a wheel, a scrollbar or a finger does, and wait
    until the view is still, off the end. On a loaded machine Chromium can drop an input sent
    while the page is busy drawing the reply (the page never saw it: no wheel or touch event
    arrived): then the reader tries again, once. A view pulled back to the end fails both times."""
    for attempt in range(2):
        _scroll_up(chat.page, how, pixels)
        try:
            # Wheels and fingers scroll on for a moment: wait until the view is still.
            chat.page.wait_for_function(SETTLED, polling=100, timeout=5_000)
            return
        except PlaywrightError:
            if attempt:
                raise


def _scroll_up(page, how: str, pixels: int) -> None:
    box = page.locator(LOG).bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    if how == "wheel":
        page.mouse.move(x, y)
        page.mouse.wheel(0, -pixels)
    elif how == "scrollbar":  # what a scrollbar drag gives the page: scrolls, no wheel, touch or key
        page.locator(LOG).evaluate("(log, pixels) => { log.scrollTop -= pixels; }", pixels)
    else:  # a finger moving down the screen, as Chromium gets it from a touch screen
        session = page.context.new_cdp_session(page)
        touch = lambda kind, *points: session.send(  # noqa: E731
            "Input.dispatchTouchEvent", {"type": kind, "touchPoints": [{"x": x, "y": py} for py in points]}
        )
        y = box["y"] + box["height"] / 4
        touch("touchStart", y)
        for step in range(1, 11):
            touch("touchMove", y + step * pixels / 10)
        touch("touchEnd")
        session.detach()


def start_long_reply(chat: ChatPage) -> None:
    """Ask for the long reply, and wait until it is longer than the view by enough to scroll up."""
    chat.open_settings()
    chat.set_number("Max new tokens", 4096)
    chat.close_settings()
    chat.send(LONG_REPLY)
    chat.page.wait_for_function(OVERFLOWING)


@pytest.mark.parametrize("how", ["wheel", "scrollbar", "finger"])
def test_scrolling_up_during_a_long_reply_stays_there_until_the_reader_comes_back(
    open_scripted, open_touch_phone, how
):
    """Before, the reader was back at the end within ~60 ms: the reply could not be read while it
    streamed."""
    # A wheel on a desktop; the scrollbar and a finger on a phone.
    chat = open_touch_phone() if how == "finger" else open_scripted("desktop" if how == "wheel" else "phone")
    page = chat.page
    start_long_reply(chat)
    page.wait_for_function(AT_END)  # the view follows the reply while the reader is at its end
    jump = page.get_by_role("button", name="Jump to newest")
    expect(jump).to_be_hidden()

    scroll_up(chat, how)
    held = page.evaluate(VIEW)
    assert held["below"] >= 300, held
    page.wait_for_function(GROWN_BY, arg=[held["height"], 200])  # dozens of updates later...
    now = page.evaluate(VIEW)
    assert abs(now["top"] - held["top"]) <= 1, (held, now)  # ...the reader is where they were
    assert now["below"] >= held["below"] + 200, (held, now)
    expect(jump).to_be_visible()
    expect(chat.stop_button).to_be_visible()  # still streaming: it was the reader, not the end

    jump.click()  # back at the end, the view follows again
    page.wait_for_function(AT_END)
    grown = page.evaluate(VIEW)["height"]
    page.wait_for_function(GROWN_BY, arg=[grown, 100])
    page.wait_for_function(AT_END)
    expect(jump).to_be_hidden()
    chat.stop()


def test_reaching_the_end_again_by_scrolling_follows_again(open_scripted):
    chat = open_scripted("phone")
    page = chat.page
    start_long_reply(chat)
    scroll_up(chat, "wheel")
    expect(page.get_by_role("button", name="Jump to newest")).to_be_visible()
    page.locator(LOG).evaluate("(log) => { log.scrollTop = log.scrollHeight; }")
    grown = page.evaluate(VIEW)["height"]
    page.wait_for_function(GROWN_BY, arg=[grown, 100])
    page.wait_for_function(AT_END)
    expect(page.get_by_role("button", name="Jump to newest")).to_be_hidden()
    chat.stop()
