"""Who may frame the page: `--allow-embed-from` and the header it sends (the browser side is in
tests/browser/test_embedding.py)."""

from __future__ import annotations

import urllib.request

import pytest

from chat.config import load_settings, parse_origins
from chat.conversation.errors import ConfigError
from chat.web.embedding import STORAGE_FALLBACK_HEAD, embedding_launch_options, frame_ancestors
from tests.helpers import serve_app


def headers_of(url: str) -> dict[str, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return {name.lower(): value for name, value in response.headers.items()}


def test_origins_come_comma_separated_or_repeated_and_a_trailing_slash_is_dropped():
    settings = load_settings(
        [
            "--allow-embed-from",
            "https://a.example/, http://localhost:8000",
            "--allow-embed-from",
            "*.b.example",
        ]
    )
    assert settings.allow_embed_from == ("https://a.example", "http://localhost:8000", "*.b.example")


def test_origins_come_from_the_environment():
    settings = load_settings([], {"ALLOW_EMBED_FROM": "https://a.example,https:"})
    assert settings.allow_embed_from == ("https://a.example", "https:")


def test_by_default_any_page_may_frame_the_app():
    assert load_settings([], {}).allow_embed_from == ()


@pytest.mark.parametrize(
    "origin",
    ["https://a.example; script-src *", "'none'", "https://a.example other", "https://a.example/page?x=1"],
)
def test_a_value_that_would_change_the_policy_is_refused_with_one_line(origin):
    with pytest.raises(ConfigError, match="--allow-embed-from: .* is not an origin"):
        parse_origins(origin)


def test_the_policy_lets_the_app_and_the_listed_origins_frame_it():
    assert frame_ancestors(["https://a.example", "https://*.b.example"]) == (
        "frame-ancestors 'self' https://a.example https://*.b.example"
    )


def test_the_storage_fallback_only_replaces_storage_that_throws():
    # The script must not replace working storage (history would then not survive a reload).
    assert "catch (error)" in STORAGE_FALLBACK_HEAD
    assert STORAGE_FALLBACK_HEAD.index("getItem(") < STORAGE_FALLBACK_HEAD.index("defineProperty")


def test_the_page_is_rendered_by_python_where_the_header_is_added():
    from chat.config import Settings
    from chat.web.page import launch_options

    settings = Settings(allow_embed_from=("https://a.example",))
    assert launch_options(settings)["ssr_mode"] is False
    assert embedding_launch_options(())["head"] == STORAGE_FALLBACK_HEAD


def test_the_default_app_sends_no_frame_blocking_header(app_url):
    headers = headers_of(app_url)
    assert "x-frame-options" not in headers
    assert "frame-ancestors" not in headers.get("content-security-policy", "")


def test_a_restricted_app_sends_frame_ancestors_on_its_page_only(local_backend):
    from chat.config import Settings

    settings = Settings(allow_embed_from=("https://a.example",))
    with serve_app(local_backend, settings) as url:
        page_headers = headers_of(url)
        api_headers = headers_of(url + "gradio_api/info")
    policies = page_headers["content-security-policy"].split("; ")
    assert "frame-ancestors 'self' https://a.example" in policies
    assert "content-security-policy" not in api_headers
