"""A hostile client on loopback (issue #17): oversize bodies, Gradio's file routes, the page's
headers, values that must not be kept, and a normal chat still answered after each attack.

The browser side (a hostile model's reply drawing over the page, loading remote images) is in
tests/browser/test_hostile.py."""

from __future__ import annotations

import gc
import json
import os
import stat

import httpx
import pytest
from gradio_client import Client

from chat.history import strip_note
from tests.reliability import ARGS, HEALTHY_TEXT, app_on_double

LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def app():
    with app_on_double(tokens_per_second=None, max_message_chars=5000, max_request_bytes=LIMIT) as served:
        yield served


def chat_works(url: str) -> bool:
    return (
        strip_note(Client(url, verbose=False).predict("Still there?", *ARGS, api_name="/chat"))
        == HEALTHY_TEXT
    )


def post_chat(http: httpx.Client, message, **kwargs) -> httpx.Response:
    body = json.dumps({"data": [message, *ARGS, None]})
    return http.post(
        "gradio_api/call/chat", content=body, headers={"content-type": "application/json"}, **kwargs
    )


def test_an_oversize_body_gets_413_with_the_limit_before_gradio_reads_it(app):
    url, double = app
    sent = len(double.generate_requests())
    with httpx.Client(base_url=url, timeout=30) as http:
        refused = post_chat(http, "x" * (2 * LIMIT))
    assert refused.status_code == 413
    assert f"at most {LIMIT:,} bytes" in refused.json()["error"]
    assert len(double.generate_requests()) == sent
    assert chat_works(url)


def test_an_oversize_body_without_a_length_is_cut_off_with_413(app):
    url, _ = app
    body = json.dumps({"data": ["y" * (2 * LIMIT), *ARGS, None]}).encode()

    def chunks():  # no Content-Length: the body arrives chunked
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    with httpx.Client(base_url=url, timeout=30) as http:
        refused = http.post(
            "gradio_api/call/chat", content=chunks(), headers={"content-type": "application/json"}
        )
    assert refused.status_code == 413
    assert chat_works(url)


def big_values_held() -> int:
    """Strings of 100,000 characters or more held in this process's dicts and lists."""
    gc.collect()
    held = set()
    for container in gc.get_objects():
        if isinstance(container, dict):
            values = container.values()
        elif isinstance(container, list):
            values = container
        else:
            continue
        try:
            held.update(id(v) for v in values if isinstance(v, str) and len(v) >= 100_000)
        except RuntimeError:  # changed while read (another thread): skip it
            continue
    return len(held)


def test_no_refused_message_is_kept_in_any_session(app):
    url, _ = app
    held = big_values_held()
    with httpx.Client(base_url=url, timeout=30) as http:
        for _ in range(12):  # each call is a session of its own
            posted = post_chat(http, "z" * 200_000)  # under the body limit, over max_message_chars
            assert posted.status_code == 200
            with http.stream("GET", f"gradio_api/call/chat/{posted.json()['event_id']}") as events:
                lines = [line for line in events.iter_lines()]
            assert any("the limit is 5,000" in line for line in lines), lines
    # The last few requests' values may still be on their way out; Gradio kept all twelve.
    assert big_values_held() - held <= 3
    assert chat_works(url)


@pytest.mark.parametrize("route", ["gradio_api/upload", "gradio_api/deep_link?session_hash=x"])
def test_gradio_routes_that_store_client_data_on_disk_are_closed(app, route):
    url, _ = app
    with httpx.Client(base_url=url, timeout=30) as http:
        answer = http.post(route, files={"files": ("a.txt", b"x" * 100_000)})
        assert answer.status_code == 404
        assert http.get(route).status_code == 404
    assert chat_works(url)


def test_the_page_has_a_policy_against_forms_styles_and_resources_from_elsewhere(app):
    url, _ = app
    with httpx.Client(base_url=url, timeout=30) as http:
        page = http.get("")
        api = http.get("gradio_api/info")
    directives = page.headers["content-security-policy"].split("; ")
    for directive in [
        "form-action 'self'",
        "img-src 'self' data: blob:",
        "style-src-attr 'none'",
        "script-src 'self' 'unsafe-inline' 'unsafe-eval'",
        "object-src 'none'",
    ]:
        assert directive in directives
    assert not any(d.startswith("frame-ancestors") for d in directives)  # any site may frame it
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "content-security-policy" not in api.headers


def test_files_the_app_hands_out_are_private_and_deleted_as_they_age(app):
    import gradio as gr

    from chat.backends.tgi import TGIBackend
    from chat.config import Settings
    from chat.ui import build_demo

    url, double = app
    demo = build_demo(TGIBackend([double.url]), Settings(backend="tgi", endpoints=(double.url,)))
    files = [block for block in demo.blocks.values() if isinstance(block, gr.File)]
    assert files  # the export's
    for block in files:
        folder = block.GRADIO_CACHE
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700, folder  # Gradio's own: 0755
    assert demo.delete_cache == (600, 600)  # and at exit
