"""Clients that flood, stall or stop the app, and what it logs and sends (issue #24, points 2, 4,
7, 9 and 10).

Run through bench/hostile.py (`--json-flood`, `--slow-connections`, `--flood`, `--sigterm`,
`--session`); each prints a Markdown table. The attacks that need the app's own process limits
(file descriptors, signals, its stderr) run `python app.py` from `--app DIR` (this checkout by
default; an older one for the "before" column) on the TGI double, as an operator would; the
attacker connects from 127.0.0.2, everyone else from 127.0.0.1. Loopback only, bounded loops.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import resource
import selectors
import signal
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

ATTACKER = "127.0.0.2"
CHAT = ["Hello there", "", 0.7, 40, 0.9, 1.0, None]


def _rss_mib(status_path: str = "/proc/self/status", field: str = "VmRSS") -> float:
    status = Path(status_path).read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1)) / 1024


def _timed_chat(url: str, source: str | None = None) -> float:
    """Seconds for one /chat call over the REST route, to its end."""
    transport = httpx.HTTPTransport(local_address=source) if source else None
    started = time.monotonic()
    with httpx.Client(base_url=url, timeout=120, transport=transport) as http:
        posted = http.post("gradio_api/call/chat", json={"data": CHAT})
        posted.raise_for_status()
        with http.stream("GET", f"gradio_api/call/chat/{posted.json()['event_id']}") as events:
            for line in events.iter_lines():
                if line.startswith("event: complete") or line.startswith("event: error"):
                    break
    return time.monotonic() - started


def json_flood(requests: int, megabytes: float) -> None:
    """`requests` chat requests just under the body limit, each of `{}` objects: RSS of this
    process (which serves the app) before, at its peak and after."""
    import gc

    from bench.hostile_servers import _app

    size = int(megabytes * 1024 * 1024) - 200
    objects = (size - 60) // 3
    body = ('{"data": [[' + "{}," * objects + '{}], "", 0.7, 20, 0.9, 1.0, null]}').encode()
    with _app(max_request_bytes=int(megabytes * 1024 * 1024)) as (url, _):
        _timed_chat(url)
        gc.collect()
        before = _rss_mib()
        statuses: dict[int, int] = {}
        started = time.monotonic()
        with httpx.Client(base_url=url, timeout=300) as http:
            ids = []
            for _ in range(requests):  # all queued at once, as a client that does not wait would
                posted = http.post(
                    "gradio_api/call/chat", content=body, headers={"content-type": "application/json"}
                )
                statuses[posted.status_code] = statuses.get(posted.status_code, 0) + 1
                if posted.status_code == 200:
                    ids.append(posted.json()["event_id"])
            for event_id in ids:
                with http.stream("GET", f"gradio_api/call/chat/{event_id}") as events:
                    for _ in events.iter_lines():
                        pass
        took = time.monotonic() - started
        gc.collect()
        after, peak = _rss_mib(), _rss_mib(field="VmHWM")
        chat_s = _timed_chat(url)
    print(
        "| requests | body | objects each | HTTP statuses | RSS before | peak | after | took | a chat after |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {requests} | {len(body) / 1e6:.2f} MB | {objects + 1:,} | "
        f"{', '.join(f'{k}: {v}' for k, v in sorted(statuses.items()))} | {before:.0f} MiB | {peak:.0f} MiB "
        f"| {after:.0f} MiB | {took:.1f} s | {chat_s:.2f} s |"
    )


def _double_and_app(app_dir: Path, extra=(), open_files=None, env=None, on_double=True):
    """The TGI double here, `python app.py` from `app_dir` on it (and on the endpoints in `extra`;
    only on those if not `on_double`); a context yielding (url, process, log path, scratch folder)."""
    import contextlib

    from tests.app_process import app_process
    from tests.tgi_double import TGIDouble

    @contextlib.contextmanager
    def running():
        scratch = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
        log_path = scratch / "app.log"
        with TGIDouble() as double:
            args = ["--backend", "tgi", *(["--endpoint", double.url] if on_double else []), *extra]
            environment = {**os.environ, "TMPDIR": str(scratch), **(env or {})}
            for name in [name for name, value in environment.items() if value is None] + ["GRADIO_TEMP_DIR"]:
                environment.pop(name, None)  # None: not set for the app
            with app_process(
                args, log_path=log_path, env=environment, repo=app_dir, open_files=open_files
            ) as (
                url,
                process,
            ):
                yield url, process, log_path, scratch

    return running()


def _healthz_s(url: str) -> float | None:
    started = time.monotonic()
    try:
        httpx.get(url + "healthz", timeout=10).raise_for_status()
    except httpx.HTTPError:
        return None
    return time.monotonic() - started


def slow_connections(app_dir: Path, count: int, hold_s: float, open_files: int) -> None:
    """`count` connections from one address, each sending half a request's headers and then
    nothing, held for `hold_s`; the app allowed `open_files` file descriptors. Prints how many
    the app still held open at times, /healthz and a chat meanwhile, and its log's size."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with _double_and_app(app_dir, open_files=open_files) as (url, _, log_path, _):
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        held, failed = _half_requests(port, count)
        started = time.monotonic()
        rows = []
        for checkpoint in (5, 15, hold_s):
            time.sleep(max(0.0, checkpoint - (time.monotonic() - started)))
            open_now = sum(1 for sock in held if _still_open(sock))
            health = _healthz_s(url)
            try:
                chat = f"{_timed_chat(url):.2f} s"
            except httpx.HTTPError as error:
                chat = f"failed ({type(error).__name__})"
            rows.append((checkpoint, open_now, health, chat))
        for sock in held:
            sock.close()
        log_bytes = log_path.stat().st_size
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    print(
        f"{count:,} connections from {ATTACKER} ({failed:,} could not connect); app limited to {open_files:,} files\n"
    )
    print("| after | still open | /healthz | a chat | ")
    print("|---|---|---|---|")
    for checkpoint, open_now, health, chat in rows:
        shown = f"{health:.2f} s" if health is not None else "no answer in 10 s"
        print(f"| {checkpoint:.0f} s | {open_now:,} | {shown} | {chat} |")
    print(f"\nthe app's log: {log_bytes / 1e6:,.2f} MB")


def _half_requests(port: int, count: int, connect_s: float = 10.0) -> tuple[list[socket.socket], int]:
    """`count` connections from ATTACKER, opened all at once (a server that stops accepting makes
    each wait), each sent half a request's headers; (those connected, how many did not)."""
    selector = selectors.DefaultSelector()  # epoll: select() takes no descriptor above 1,023
    for _ in range(count):
        sock = socket.socket()
        sock.bind((ATTACKER, 0))
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        selector.register(sock, selectors.EVENT_WRITE)
    held, deadline = [], time.monotonic() + connect_s
    while selector.get_map() and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.2):
            sock = key.fileobj
            selector.unregister(sock)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                try:
                    sock.send(b"GET / HTTP/1.1\r\nHost: falcon\r\n")
                    held.append(sock)
                    continue
                except OSError:
                    pass
            sock.close()
    for key in list(selector.get_map().values()):
        key.fileobj.close()
    selector.close()
    return held, count - len(held)


def _still_open(sock: socket.socket) -> bool:
    try:
        return sock.recv(1024) != b""
    except BlockingIOError:
        return True  # nothing to read: still open
    except OSError:
        return False


def flood(app_dir: Path, requests: int, rate: float) -> None:
    """`requests` chat requests from one address at `rate` a second, while another address
    chats: how long its chats take, and what the flooding address got."""
    with _double_and_app(app_dir) as (url, _, _, _):
        baseline = [_timed_chat(url) for _ in range(3)]
        statuses: dict = {}

        def attack():
            transport = httpx.HTTPTransport(local_address=ATTACKER)
            lock = threading.Lock()
            with httpx.Client(base_url=url, timeout=30, transport=transport) as http:

                def one():
                    try:
                        status = http.post("gradio_api/call/chat", json={"data": CHAT}).status_code
                    except httpx.HTTPError:
                        status = "no answer"
                    with lock:
                        statuses[status] = statuses.get(status, 0) + 1

                # Sent on schedule whatever the answers take: 32 requests may be on their way at once.
                with concurrent.futures.ThreadPoolExecutor(32) as pool:
                    started = time.monotonic()
                    for number in range(requests):
                        time.sleep(max(0.0, number / rate - (time.monotonic() - started)))
                        pool.submit(one)

        attacker = threading.Thread(target=attack, daemon=True)
        attacker.start()
        during = []
        while attacker.is_alive():
            during.append(_timed_chat(url))
        attacker.join()
    print("| flood | its statuses | a chat before (median) | during: median / max (count) |")
    print("|---|---|---|---|")
    print(
        f"| {requests:,} at {rate:g}/s | {', '.join(f'{k}: {v:,}' for k, v in sorted(statuses.items(), key=str))} "
        f"| {statistics.median(baseline):.2f} s | {statistics.median(during):.2f} / {max(during):.2f} s ({len(during)}) |"
    )


def sigterm(app_dir: Path, megabytes: float) -> None:
    """Export about `megabytes` MB of conversations, then SIGTERM: what stays on disk."""
    history = [
        {"role": r, "content": [{"type": "text", "text": t}]}
        for r, t in [("user", "Hi"), ("assistant", "Yo")]
    ]
    with _double_and_app(app_dir) as (url, process, _, scratch):
        with httpx.Client(base_url=url, timeout=60) as http:
            for number in range(max(1, int(megabytes))):
                posted = http.post(
                    "gradio_api/call/export", json={"data": [history, f"{number} ".ljust(500_000, "x")]}
                )
                with http.stream("GET", f"gradio_api/call/export/{posted.json()['event_id']}") as events:
                    for _ in events.iter_lines():
                        pass
        before = _disk_mb(scratch, "falcon-chat-files-*")
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        took = time.monotonic() - started
        after = _disk_mb(scratch, "falcon-chat-files-*")
    print("| exports on disk | SIGTERM: exit status | took | left on disk |")
    print("|---|---|---|---|")
    print(f"| {before:.0f} MB | {code} | {took:.1f} s | {after:.0f} MB |")


def _disk_mb(folder: Path, pattern: str) -> float:
    return sum(f.stat().st_size for d in folder.glob(pattern) for f in d.rglob("*") if f.is_file()) / 1e6


def session(app_dir: Path, messages: int) -> None:
    """A short session on an endpoint whose URL carries a password and that answers HTTP 500
    repeating its input and a token: log lines with credentials or the user's words, lines that
    are not one record, and requests to the internet (through a recording proxy) from start-up on."""
    from tests.helpers import RecordingServer
    from tests.tgi_double import Reply, TGIDouble

    secret_words = "my password is hunter2"
    proxy = RecordingServer(502)
    with TGIDouble() as echoing:
        echoing.reply_for = lambda body: Reply(
            fail="http_500", error=f"Bearer hf_BenchSecret0123 for {body['inputs']}"
        )
        extra = [
            "--endpoint",
            echoing.url.replace("http://", "http://alice:pa55word@"),
            "--busy-retries",
            "0",
        ]
        env = {**{name: proxy.url for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}}
        env.update(
            NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", GRADIO_ANALYTICS_ENABLED=None
        )
        with _double_and_app(app_dir, extra=extra, env=env, on_double=False) as (url, _, log_path, _):
            for number in range(messages):
                body = {"data": [f"{secret_words}\nforged line {number}", "", 0.7, 40, 0.9, 1.0, None]}
                with httpx.Client(base_url=url, timeout=60) as http:
                    posted = http.post("gradio_api/call/chat", json=body)
                    with http.stream("GET", f"gradio_api/call/chat/{posted.json()['event_id']}") as events:
                        for _ in events.iter_lines():
                            pass
            lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    proxy.close()
    record = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")
    credentials = sum("pa55word" in line or "hf_BenchSecret0123" in line for line in lines)
    words = sum("hunter2" in line for line in lines)
    strays = sum(not record.match(line) and "Falcon Chat" not in line for line in lines)
    print(
        "| log lines | with credentials | with the user's words | not one record | requests to the internet |"
    )
    print("|---|---|---|---|---|")
    print(
        f"| {len(lines)} | {credentials} | {words} | {strays} | {len(proxy.requests)} {sorted(set(proxy.requests))} |"
    )
    print(json.dumps({"strays": [line for line in lines if not record.match(line)][:5]}))
