"""A hostile client on loopback (issue #17): oversize bodies, Gradio's file routes, the page's
headers, values that must not be kept, and a normal chat still answered after each attack.

The browser side (a hostile model's reply drawing over the page, loading remote images) is in
tests/browser/test_hostile.py."""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import stat

import httpx
import pytest
from gradio_client import Client

from chat.conversation.turns import strip_note
from tests.helpers import rest_call
from tests.reliability import ARGS, HEALTHY_TEXT, app_on_double, settled
from tests.tgi_double import Reply, TGIDouble

LIMIT = 256 * 1024
ABOUT = {"title": "A chat", "time": "2026-12-08 14:32"}  # what the page sends /export: its files' names


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


def test_a_body_of_many_small_json_values_is_refused_before_it_is_parsed(app):
    """Under the size limit, `{},` repeated builds an object per three bytes: 32 such requests
    took the app from 149 MB to 4.9 GB before."""
    url, double = app
    sent = len(double.generate_requests())
    many = ('{"data": [' + "{}," * 80_000 + '"Hello", "", 0.7, 20, 0.9, 1.0, null]}').encode()
    deep = ('{"data": [' + "[" * 5_000 + "]" * 5_000 + ', "", 0.7, 20, 0.9, 1.0, null]}').encode()
    with httpx.Client(base_url=url, timeout=30) as http:
        for body in (many, deep):
            assert len(body) < LIMIT
            for route in ("gradio_api/call/chat", "gradio_api/queue/join"):
                refused = http.post(route, content=body, headers={"content-type": "application/json"})
                assert refused.status_code == 413, refused.text[:200]
                assert "this server accepts at most" in refused.json()["error"]
    assert len(double.generate_requests()) == sent
    assert chat_works(url)


def test_a_long_conversation_is_still_accepted(app):
    url, _ = app
    history = [
        {"role": role, "content": [{"type": "text", "text": f"{role} turn {number}"}]}
        for number in range(1000)
        for role in ("user", "assistant")
    ]
    status, event, payload = rest_call(url, "export", json.dumps({"data": [history, "", ABOUT]}))
    assert (status, event) == (200, "complete"), payload


def test_the_file_route_does_not_look_up_hosts_a_client_names(app, monkeypatch):
    """`/gradio_api/file=http://host/...` had the server resolve `host` (Gradio checks whether an
    address is public before fetching it); the app hands out no such URL."""
    import socket

    url, _ = app
    looked_up = []
    resolve = socket.getaddrinfo
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        lambda host, *args, **kwargs: (looked_up.append(host), resolve(host, *args, **kwargs))[1],
    )
    with httpx.Client(base_url=url, timeout=30) as http:
        for path in ["gradio_api/file=http://falcon-probe.invalid/x", "file=https://falcon-probe.invalid/x"]:
            assert http.get(path).status_code == 404
    assert "falcon-probe.invalid" not in looked_up


def big_values_held() -> int:
    """Strings of 100,000 characters or more held in this process's dicts and lists."""
    gc.collect()
    held = set()
    for container in gc.get_objects():
        # Exact types: some dict subclasses compute their values (transformers' lazy mappings).
        if type(container) is dict:
            values = container.values()
        elif type(container) is list:
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
        page, again = http.get(""), http.get("")
        api = http.get("gradio_api/info")
    directives = page.headers["content-security-policy"].split("; ")
    for directive in [
        "form-action 'self'",
        "img-src 'self' data: blob:",
        "style-src-attr 'none'",
        "object-src 'none'",
    ]:
        assert directive in directives
    scripts = next(d for d in directives if d.startswith("script-src "))
    nonce = re.search(r"'nonce-([^']+)'", scripts).group(1)
    assert "'unsafe-inline'" not in scripts and "'sha256-" in scripts  # the head's scripts, by hash
    assert page.text.count("<script") == page.text.count(f'<script nonce="{nonce}"') > 0
    assert nonce not in again.headers["content-security-policy"]  # one per response
    assert not any(d.startswith("frame-ancestors") for d in directives)  # any site may frame it
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "content-security-policy" not in api.headers


def test_a_chatbot_built_to_render_a_messages_forms_and_images_stops_the_start():
    """The chat's tags are shown as text through the Chatbot's own arguments; a Chatbot built
    without them (a new one on the page, a refactor) would render a reply's forms and remote
    images: the start stops instead (tests/browser/test_hostile.py sees the effect in the page)."""
    import gradio as gr

    from chat.web.security import harden_demo, text_only_chatbot

    with gr.Blocks() as guarded:
        gr.Chatbot(**text_only_chatbot())
    harden_demo(guarded)
    with gr.Blocks() as bare:
        gr.Chatbot(label="Conversation")
    with pytest.raises(RuntimeError, match="'Conversation' is built without .*text_only_chatbot"):
        harden_demo(bare)


def test_files_the_app_hands_out_are_private_and_deleted_as_they_age(app):
    import gradio as gr

    from chat.backends.remote.tgi import TGIBackend
    from chat.config import Settings
    from chat.web.page import build_demo

    url, double = app
    demo = build_demo(TGIBackend([double.url]), Settings(backend="tgi", endpoints=(double.url,)))
    files = [block for block in demo.blocks.values() if isinstance(block, gr.File)]
    assert files  # the export's
    for block in files:
        folder = block.GRADIO_CACHE
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700, folder  # Gradio's own: 0755
    assert demo.delete_cache == (600, 600)  # and at exit


# -- logs --------------------------------------------------------------------------------------

TOKEN = "hf_LogSentinelTokenNeverLogged0123456789"
FORGED = 'hello\n2026-11-25 INFO falcon_chat.requests: {"event": "reply", "forged": true}\u2028next'


def one_line_records(caplog) -> list[str]:
    texts = [record.getMessage() for record in caplog.records]
    for text in texts:
        assert not any(c in text for c in "\n\r\x85\u2028\u2029"), text
    return texts


def test_server_text_in_logs_is_one_line_without_the_message_or_the_token(caplog):
    caplog.set_level(logging.DEBUG)
    with app_on_double(tokens_per_second=None, token=TOKEN) as (url, double):
        # A server whose error repeats what it was sent, Authorization header included.
        double.reply_for = lambda body: Reply(
            fail="error_mid",
            after_tokens=1,
            error=f"cannot serve Authorization: Bearer {TOKEN} for input {body['inputs']}",
        )
        reply = Client(url, verbose=False).predict(FORGED, *ARGS, api_name="/chat")
        del double.reply_for
        assert "failed" in reply
        assert chat_works(url)
    texts = one_line_records(caplog)
    assert not any(TOKEN in text or "forged" in text for text in texts + [caplog.text])
    request_lines = [r.getMessage() for r in caplog.records if r.name == "falcon_chat.requests"]
    failed = [json.loads(line) for line in request_lines if '"error_kind": "GenerationFailed"' in line]
    assert failed and "withheld" in failed[0]["error_detail"]


def test_with_log_messages_the_text_is_logged_escaped_and_scrubbed(caplog):
    caplog.set_level(logging.INFO)
    with app_on_double(tokens_per_second=None, token=TOKEN, log_messages=True) as (url, double):
        double.reply_for = lambda body: Reply(
            fail="error_mid", after_tokens=1, error=f"Bearer {TOKEN} for input {body['inputs']}"
        )
        Client(url, verbose=False).predict(FORGED, *ARGS, api_name="/chat")
        del double.reply_for
    texts = one_line_records(caplog)
    assert not any(TOKEN in text for text in texts)
    record = json.loads(next(t for t in texts if '"error_kind": "GenerationFailed"' in t))
    assert record["message"] == FORGED  # kept exactly, as JSON escapes
    assert "forged" in record["error_detail"] and "Bearer hf_***" in record["error_detail"]


def test_credentials_in_an_endpoint_address_are_not_logged(caplog):
    from chat.backends.remote.tgi import TGIBackend
    from chat.config import Settings
    from tests.helpers import free_port, serve_app
    from tests.reliability import QUICK

    caplog.set_level(logging.DEBUG)
    down = f"http://admin:pa55word@127.0.0.1:{free_port()}"  # nothing listens there
    with TGIDouble() as double:
        backend = TGIBackend([down, double.url], options=QUICK)
        try:
            with serve_app(backend, Settings(backend="tgi", endpoints=(double.url,))) as url:
                assert Client(url, verbose=False).predict("Hello", *ARGS, api_name="/chat")
        finally:
            backend.close()
    texts = one_line_records(caplog)
    assert any("admin" not in t and "127.0.0.1" in t and "***@" in t for t in texts), texts
    assert "pa55word" not in caplog.text


# -- small edges -------------------------------------------------------------------------------


def error_of(payload) -> str:
    return payload.get("error") if isinstance(payload, dict) else str(payload)


@pytest.mark.parametrize("field", [0, 1])  # a lone surrogate in the message, in the system prompt
def test_a_lone_surrogate_is_replaced_and_answered(app, field):
    url, double = app
    values = ['"Hello \\ud800 there"', '""']
    values[field] = '"Hi \\udc00"'
    status, event, payload = rest_call(
        url, "chat", '{"data": [' + ", ".join(values) + ", 0.7, 20, 0.9, 1.0, null]}"
    )
    assert (status, event) == (200, "complete"), payload
    assert "\ufffd" in double.generate_requests()[-1].body["inputs"]
    assert chat_works(url)


@pytest.mark.parametrize("values", [["Hello"], ["Hello", *ARGS, None, "extra"]])
def test_a_wrong_number_of_values_is_refused_naming_them(app, values):
    url, _ = app
    status, event, payload = rest_call(url, "chat", json.dumps({"data": values}))
    assert event == "error"
    assert error_of(payload).startswith("/chat takes 7 values, in this order: Message, System prompt")


def test_an_unknown_keyword_or_endpoint_is_a_client_error_not_a_500(app):
    url, _ = app
    status, _, payload = rest_call(url, "v2/chat", json.dumps({"message": "Hello", "bogus": 1}))
    assert status == 422 and "`bogus` is not a valid" in payload["error"]
    status, _, payload = rest_call(url, "v2/nothing", json.dumps({"message": "Hello"}))
    assert status == 404 and "/nothing" in payload["error"]
    status, event, _ = rest_call(url, "v2/chat", json.dumps({"message": "Hello"}))
    assert (status, event) == (200, "complete")


@pytest.mark.parametrize("system_prompt", [123, ["be brief"], {"role": "system"}])
def test_a_system_prompt_that_is_not_text_is_refused(app, system_prompt):
    url, double = app
    sent = len(double.generate_requests())
    status, event, payload = rest_call(
        url, "chat", json.dumps({"data": ["Hello", system_prompt, 0.7, 20, 0.9, 1.0, None]})
    )
    assert event == "error" and error_of(payload) == "The system prompt must be text."
    assert len(double.generate_requests()) == sent


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "Please type the text to continue first."),
        (5, "The text to continue must be text."),
        ("x" * 6000, "The text is 6,000 characters long; the limit is 5,000. Please shorten it."),
    ],
)
def test_completion_errors_name_its_text(app, text, error):
    url, _ = app
    status, event, payload = rest_call(
        url, "complete", json.dumps({"data": [text, 0.7, 20, 0.9, 1.0, None, ""]})
    )
    assert event == "error" and error_of(payload) == error


@pytest.mark.parametrize("fail", ["silent_before", "silent_mid"])
def test_a_reply_stopped_while_the_server_is_silent_closes_its_stream_at_once(fail):
    """A slow or busy server (the wait for the first token, or for the next): the reply's thread
    sits in a blocking read, and before, the server kept generating until its next token came or
    the timeout passed (here a minute)."""
    from chat.backends.remote.failover import RemoteOptions
    from chat.backends.remote.tgi import TGIBackend
    from chat.config import Settings
    from tests.helpers import serve_app

    patient = RemoteOptions(first_token_timeout_s=60, token_timeout_s=60, busy_retries=0)
    with TGIDouble(tokens_per_second=50) as double:
        double.script(Reply(fail=fail, after_tokens=2))
        backend = TGIBackend([double.url], options=patient)
        try:
            with serve_app(backend, Settings(backend="tgi", endpoints=(double.url,))) as url:
                job = Client(url, verbose=False).submit("Hello", *ARGS, api_name="/chat")
                if fail == "silent_mid":
                    for count, _ in enumerate(job):
                        if count >= 1:
                            break
                else:
                    assert settled(lambda: double.active == 1)
                job.cancel()
                assert double.wait_for_disconnects(1, timeout=5.0)
                assert strip_note(Client(url, verbose=False).predict("Hi", *ARGS, api_name="/chat"))
        finally:
            backend.close()


def served_paths(payload) -> list[str]:
    """The paths of the files an export call handed out."""
    files = payload[0]["value"] if isinstance(payload[0], dict) else payload[0]
    return [file["path"] for file in files]


def test_exports_in_a_loop_keep_a_bounded_amount_of_private_files_and_nobody_elses_go(app, monkeypatch):
    """Each export is kept 10 minutes whatever others export: before, others' exports evicted a
    victim's within seconds (the budget was shared, newest first)."""
    from chat.web import security
    from chat.web.security import EXPORTS_FULL, private_gradio_cache

    monkeypatch.setattr(security, "EXPORTS_DISK_BUDGET", 1_000_000)
    url, _ = app
    exports = os.path.join(private_gradio_cache(), "exports")
    history = [
        {"role": role, "content": [{"type": "text", "text": text}]}
        for role, text in [("user", "Hi"), ("assistant", "Hello")]
    ]
    status, event, payload = rest_call(
        url, "export", json.dumps({"data": [history, "the victim's export", ABOUT]})
    )
    assert (status, event) == (200, "complete"), payload
    victims = served_paths(payload)
    events = []
    for number in range(30):  # 100 KB a call (Markdown and JSON): 3 MB in all
        status, event, payload = rest_call(
            url, "export", json.dumps({"data": [history, f"{number} " * 25_000, ABOUT]})
        )
        events.append(event)
        assert event == "complete" or error_of(payload) == EXPORTS_FULL, payload
    assert 5 <= events.count("complete") <= 11 and events[-1] == "error"
    kept = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(exports) for f in files)
    assert 0 < kept <= 1_200_000  # the budget, and the one export that went past it
    assert stat.S_IMODE(os.stat(private_gradio_cache()).st_mode) == 0o700
    with httpx.Client(base_url=url, timeout=30) as http:
        for path in victims:
            assert path.startswith(private_gradio_cache())  # Gradio's copy, in the private folder too
            assert http.get(f"gradio_api/file={path}").status_code == 200
    assert chat_works(url)


# -- points 3 and 4 of the issue (prompt fitting) seen from outside -------------------------------


def test_a_huge_system_prompt_is_refused_by_name_before_anything_is_counted(app):
    url, double = app
    counted = len([r for r in double.requests if r.path == "/tokenize"])
    data = json.dumps({"data": ["Hello", "s" * 200_000, 0.7, 20, 0.9, 1.0, None]})
    status, event, payload = rest_call(url, "chat", data)
    assert event == "error" and error_of(payload).startswith("The system prompt is 200,000 characters")
    assert len([r for r in double.requests if r.path == "/tokenize"]) == counted
    with httpx.Client(base_url=url, timeout=30) as http:  # 5 MB: not even read
        body = json.dumps({"data": ["Hello", "s" * 5_000_000, 0.7, 20, 0.9, 1.0, None]})
        assert http.post("gradio_api/call/chat", content=body).status_code == 413


def test_a_normal_chat_is_answered_after_every_attack_above(app):
    assert chat_works(app[0])


@pytest.mark.parametrize(
    "model_id, span",
    [
        ("falcon-7b", "`falcon-7b`"),
        ("a`b", "``a`b``"),  # a fence longer than any run of backticks inside
        ("`x`", "`` `x` ``"),  # padded: CommonMark strips one space each side
        ("x\n<y>", "`x <y>`"),  # one line
    ],
)
def test_a_model_id_is_a_code_span_shown_as_the_text_it_is(model_id, span):
    """Backslash escapes were not enough in the chat: its math renderer read `\\[y\\]` as math."""
    from chat.web.security import markdown_code

    assert markdown_code(model_id) == span
