"""Take the README's screenshots: `python -m tests.browser.readme_screenshots`.

Not a test (a screenshot asserts nothing; the page's look is checked by tests/browser/test_look.py):
it serves the app on the browser tests' scripted model, asks two short questions in chats of their
own (listed beside the conversation), then for the wide code and table in a new chat, and
writes the page at 1366x900 (light) and 390x844 (dark) to assets/screenshot-desktop.png and
assets/screenshot-phone.png, and every size and theme to tests/screenshots/ to be looked at.
Needs Chromium (`CHROMIUM=/path`, default /usr/bin/chromium).
"""

from __future__ import annotations

import os

from playwright.sync_api import sync_playwright

from chat.config import Settings
from tests.browser.chat_page import ChatPage
from tests.browser.conftest import ASSETS, CHROMIUM, CHROMIUM_ARGS, SCREENSHOTS, SIZES, ScriptedBackend
from tests.helpers import serve_app

README = {("desktop", "light"): "screenshot-desktop.png", ("phone", "dark"): "screenshot-phone.png"}
MESSAGE = "Please write code and a table"
# Resolves once every CSS transition running now has finished (a button's hover colour fading).
SETTLED = """() => Promise.all(document.getAnimations()
  .filter((animation) => animation instanceof CSSTransition).map((animation) => animation.finished))"""
EARLIER_CHATS = ("Plan a weekend in Lisbon", "What is the capital of France?")  # listed beside it


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    SCREENSHOTS.mkdir(exist_ok=True)
    with serve_app(ScriptedBackend(), Settings()) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for size in SIZES:
                for theme in ("light", "dark"):
                    context = browser.new_context(viewport=SIZES[size], color_scheme=theme)
                    chat = ChatPage(context.new_page(), url).open(f"?__theme={theme}")
                    for earlier in EARLIER_CHATS:
                        chat.ask(earlier)
                        chat.new_chat()
                    chat.ask(MESSAGE)
                    chat.page.mouse.move(0, SIZES[size]["height"] - 1)  # no button shown hovered...
                    chat.page.evaluate(SETTLED)  # ...once its colour has gone back
                    paths = [SCREENSHOTS / f"page-{size}-{theme}.png"]
                    if (size, theme) in README:
                        paths.append(ASSETS / README[size, theme])
                    for path in paths:
                        chat.page.screenshot(path=str(path))
                        print(path)
                    context.close()
        finally:
            browser.close()


if __name__ == "__main__":
    main()
