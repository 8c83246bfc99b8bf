"""The app as an operator runs it: `python app.py` in a process of its own, its log on stderr,
stopped by SIGTERM (systemd, `docker stop`).

- Every line it logs is one record, without credentials or the user's words, whichever library
  wrote it: the HTTP client logs each request's URL, and the endpoint's URL carries a password;
  a server answers HTTP 500 with an error that repeats its input (the user's message, holding a
  forged log record) and the Authorization header, which failover logs.
- It sends nothing to the internet by itself: a proxy that every outside request would go
  through (HTTP_PROXY, HTTPS_PROXY; loopback excepted) records none. Gradio's telemetry (usage
  analytics, a version check) used to go out at start-up.
- SIGTERM stops it as Ctrl-C does, and its private folder of exports is removed; before, 67 MB of
  exports stayed in /tmp.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
from gradio_client import Client

from tests.app_process import app_process
from tests.helpers import RecordingServer, rest_call
from tests.tgi_double import DEFAULT_TEXT, Reply, TGIDouble

TOKEN = "hf_ProcessLogSentinel0123456789"
BASIC = "YWxpY2U6cGE1NXdvcmQ="  # alice:pa55word
SECRET_WORDS = "my password is hunter2 and my account 12345678"
MESSAGE = (
    f'{SECRET_WORDS}\n2026-11-25 10:00:00,000 INFO falcon_chat.requests: {{"event": "reply", "forged": true}}'
)
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """`python app.py` on two TGI doubles: one (behind a URL with a password) answers HTTP 500
    with an error repeating its input and credentials, the other answers. Yields (url, process,
    log path, its temporary folder, the proxy)."""
    scratch = tmp_path_factory.mktemp("app-process")
    proxy = RecordingServer(502)  # stands for the internet: every outside request goes through it
    with TGIDouble() as healthy, TGIDouble() as echoing:
        echoing.reply_for = lambda body: Reply(
            fail="http_500",
            error=f"cannot serve Authorization=Bearer {TOKEN}, Basic {BASIC}, for {body['inputs']}",
        )
        env = {
            **os.environ,
            "TMPDIR": str(scratch),
            "HF_TOKEN": TOKEN,
            **{name: proxy.url for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")},
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
        for name in ("GRADIO_ANALYTICS_ENABLED", "GRADIO_TEMP_DIR", "HF_HUB_DISABLE_TELEMETRY"):
            env.pop(name, None)
        credentialed = echoing.url.replace("http://", "http://alice:pa55word@")
        args = [
            "--backend",
            "tgi",
            "--endpoint",
            credentialed,
            "--endpoint",
            healthy.url,
            "--busy-retries",
            "0",
        ]
        log_path = scratch / "app.log"
        try:
            with app_process(args, log_path=log_path, env=env) as (url, process):
                yield url, process, log_path, scratch, proxy
        finally:
            proxy.close()


def test_every_line_it_logs_is_one_record_without_secrets_or_the_users_words(running):
    url, _, log_path, _, _ = running
    client = Client(url, verbose=False)
    for _ in range(2):  # the turns alternate: one of the two goes to the failing endpoint first
        assert DEFAULT_TEXT in client.predict(MESSAGE, "", 0.7, 40, 0.9, 1.0, "", api_name="/chat")
    lines = log_path.read_text(encoding="utf-8").splitlines()  # a reply is logged before it is sent
    log_lines = [line for line in lines if LOG_LINE.match(line)]
    for secret in ("pa55word", TOKEN, BASIC, "hunter2", "12345678", "forged"):
        assert not any(secret in line for line in lines), secret
    assert any("HTTP Request: POST http://***@127.0.0.1" in line for line in log_lines)  # httpx2's
    assert any("failed before its first token" in line and "withheld" in line for line in log_lines)
    assert all(LOG_LINE.match(line) or "Falcon Chat" in line for line in lines), lines
    replies = [json.loads(line.split(": ", 1)[1]) for line in log_lines if " falcon_chat.requests: " in line]
    assert len(replies) == 2 and all(reply["error_kind"] is None for reply in replies)


def test_an_event_that_fails_inside_gradio_is_one_scrubbed_log_record(running):
    """A value the completion's presets do not hold fails Gradio's own check of the dropdown,
    before our function: Gradio printed its traceback to stderr, twenty lines quoting the token
    the client sent. (The page's other events check their values themselves: preprocess=False.)"""
    url, _, log_path, _, _ = running
    before = len(log_path.read_text(encoding="utf-8").splitlines())
    status, event, _ = rest_call(url, "preset", json.dumps({"data": [f"Bearer {TOKEN}"]}))
    assert (status, event) == (200, "error")
    deadline = time.monotonic() + 10  # Gradio logs the failure after it has answered the client
    while True:
        lines = log_path.read_text(encoding="utf-8").splitlines()[before:]
        failed = [
            line for line in lines if " ERROR gradio: an event failed inside Gradio | Traceback" in line
        ]
        if failed or any(line.startswith("Traceback") for line in lines) or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # polling the log file for the line, not waiting for time to pass
    assert len(failed) == 1 and "is not in the list of choices" in failed[0], lines
    assert all(LOG_LINE.match(line) for line in lines), lines
    assert [line for line in lines if TOKEN in line] == []


def test_it_sends_nothing_to_the_internet_by_itself(running):
    *_, proxy = running
    assert proxy.requests == []


def test_sigterm_stops_it_and_its_exports_are_removed(running):
    url, process, _, scratch, _ = running
    history = [
        {"role": role, "content": [{"type": "text", "text": text}]}
        for role, text in [("user", "Hi"), ("assistant", "Hello")]
    ]
    status, event, payload = rest_call(
        url,
        "export",
        json.dumps({"data": [history, "x" * 100_000, {"title": "A chat", "time": "2026-12-08 14:32"}]}),
    )
    assert (status, event) == (200, "complete"), payload
    folders = list(scratch.glob("falcon-chat-files-*"))
    assert folders and any(folders[0].rglob("falcon-chat-a-chat-2026-12-08-1432.json"))
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert not any(folder.exists() for folder in folders)
