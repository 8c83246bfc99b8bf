"""Model servers that hang or misbehave, against the app (issue #24, points 3, 5 and 6).

Run through bench/hostile.py (`--hung-endpoint`, `--round-robin`, `--endless`, `--long-line`,
`--bad-token`); each prints a Markdown table. Loopback only: a hung server (tests/hung_server.py),
the TGI double (tests/tgi_double.py) and its hostile faults (tests/reliability.py). Written so the
same file runs against an older checkout of the app, for the "before" column.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import time
from pathlib import Path

import httpx


def _rss_peak_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024


def _chat(backend, message: str) -> str:
    from chat.conversation.params import GenerationParams
    from chat.conversation.reply import stream_reply

    return list(stream_reply(backend, message, [], "", GenerationParams(), max_message_chars=10_000))[-1]


def hung_endpoint(messages: int, connect_s: float, first_token_s: float) -> None:
    """One endpoint that accepts connections and never answers, one that answers (listed first,
    then second: which one a request asks first depends on the turn): how long the backend's
    start-up question (the context) and each message take, and how often the hung one was asked.
    Backend level: what the page's build and a chat message ask of it."""
    from chat.backends.remote.failover import RemoteOptions
    from chat.backends.remote.tgi import TGIBackend
    from tests.hung_server import HungServer
    from tests.tgi_double import TGIDouble

    options = RemoteOptions(
        connect_timeout_s=connect_s,
        first_token_timeout_s=first_token_s,
        token_timeout_s=first_token_s,
        busy_retries=0,
    )
    print(f"connect timeout {connect_s:g} s, first-token timeout {first_token_s:g} s\n")
    print(
        "| hung endpoint | start-up (context asked) | messages answered | per message: median / max "
        "| all messages | hung one asked |"
    )
    print("|---|---|---|---|---|---|")
    for hung_first in (True, False):
        with HungServer() as hung, TGIDouble() as alive:
            started = time.monotonic()
            endpoints = [hung.url, alive.url] if hung_first else [alive.url, hung.url]
            backend = TGIBackend(endpoints, options=options)
            backend.context_length()
            startup = time.monotonic() - started
            seconds = []
            for number in range(messages):
                started = time.monotonic()
                _chat(backend, f"Message number {number}, please answer")
                seconds.append(time.monotonic() - started)
            backend.close()
            answered = len(alive.generate_requests())
            print(
                f"| listed {'first' if hung_first else 'second'} | {startup:.2f} s | {answered} of {messages} "
                f"| {statistics.median(seconds):.2f} / {max(seconds):.2f} s | {sum(seconds):.1f} s "
                f"| {hung.connections} connections |"
            )


def round_robin(messages: int) -> None:
    """Two healthy endpoints: where each message's stream went."""
    from chat.backends.remote.tgi import TGIBackend
    from tests.tgi_double import TGIDouble

    with TGIDouble() as first, TGIDouble() as second:
        backend = TGIBackend([first.url, second.url])
        for number in range(messages):
            _chat(backend, f"Message number {number}, please answer")
        backend.close()
        print("| messages | streams to the first | streams to the second |")
        print("|---|---|---|")
        print(f"| {messages} | {len(first.generate_requests())} | {len(second.generate_requests())} |")


def _app(**settings):
    """The app in this process on the TaggedDouble, with only the settings this checkout has."""
    from chat.config import Settings
    from tests.reliability import app_on_double

    known = {f.name for f in dataclasses.fields(Settings)}
    return app_on_double(tokens_per_second=None, **{k: v for k, v in settings.items() if k in known})


def _stream_chat(
    url: str, message: str, max_new_tokens: int, seconds: float
) -> tuple[str, str | None, float]:
    """One /chat call over Gradio's REST route, read for at most `seconds`: (the last text it
    showed, the event it ended with or None if still streaming, seconds taken)."""
    body = json.dumps({"data": [message, "", 0.7, max_new_tokens, 0.9, 1.0, None]})
    started = time.monotonic()
    text, ended = "", None
    with httpx.Client(base_url=url, timeout=60) as http:
        posted = http.post("gradio_api/call/chat", content=body, headers={"content-type": "application/json"})
        with http.stream("GET", f"gradio_api/call/chat/{posted.json()['event_id']}") as events:
            event = None
            for line in events.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event in ("generating", "complete", "error"):
                    data = json.loads(line[5:])
                    if event == "error":
                        text, ended = json.dumps(data), "error"
                        break
                    if data:
                        text = data[0] if isinstance(data[0], str) else str(data[0])
                    if event == "complete":
                        ended = "complete"
                        break
                if time.monotonic() - started > seconds:
                    break
    return text, ended, time.monotonic() - started


def endless(seconds: float, max_new_tokens: int) -> None:
    """A server that ignores max_new_tokens and never stops: what reaches the client in `seconds`."""
    import tests.reliability as reliability

    reliability.ENDLESS_TOKENS = 10**9
    with _app() as (url, double):
        cpu = time.process_time()
        text, ended, took = _stream_chat(url, "[fault:endless] Hi", max_new_tokens, seconds)
        cpu = time.process_time() - cpu
    words = len(re.findall(r"\bw\d+\b", text)) + 2
    print("| max new tokens asked | tokens shown | reply ended | read for | this process's CPU |")
    print("|---|---|---|---|---|")
    print(
        f"| {max_new_tokens} | {words:,} | {ended or 'no (still streaming)'} | {took:.1f} s | {cpu:.1f} s |"
    )


def long_line(megabytes: int) -> None:
    """A server that sends one line of `megabytes` MB without a newline."""
    import tests.reliability as reliability

    reliability.LONG_LINE_BYTES = megabytes * 1024 * 1024
    with _app() as (url, double):
        before = _rss_peak_mib()
        text, ended, took = _stream_chat(url, "[fault:long_line] Hi", 200, 120)
        after = _rss_peak_mib()
        sent = double.bytes_sent
    note = text.rsplit("\n", 1)[-1][:90] if text else ""
    print(
        "| line sent | bytes the server wrote before the app hung up | peak RSS before / after | took | reply ends |"
    )
    print("|---|---|---|---|---|")
    print(
        f"| {megabytes} MB | {sent / 1e6:,.0f} MB | {before:.0f} / {after:.0f} MiB (+{after - before:.0f}) "
        f"| {took:.1f} s | {ended}: {note} |"
    )


def bad_token() -> None:
    """A token whose text is a number, then one whose text is an object: what the API returns,
    and whether the next chat is answered."""
    print("| token's text | /chat answered | next chat |")
    print("|---|---|---|")
    with _app() as (url, _):
        for fault in ("number_text", "object_text"):
            text, ended, _ = _stream_chat(url, f"[fault:{fault}] Hi", 200, 30)
            shown = text.replace("\n", " ")[-110:]
            after, after_ended, _ = _stream_chat(url, "Still there?", 200, 30)
            print(f"| {fault.split('_')[0]} | {ended}: {shown} | {after_ended}, {len(after.split())} words |")
