"""What the reliability tests share: the TGI double answering by a tag in the message, and the whole
app served on it.

`TaggedDouble` stands in for a TGI server whose failures hit one user and not another: a message
containing `[fault:NAME]` gets that failure (every attempt, so retries cannot hide it), any other
message the healthy `HEALTHY_TEXT`. Besides the double's own failures it can send a malformed event
(`malformed`), end the stream cleanly without TGI's final event (`truncated`), stream a token of
1 MB (`huge_token`), and, after two good tokens, act as a hostile or broken server would: ignore
`max_new_tokens` (`endless`: up to `ENDLESS_TOKENS`), send one line without end (`long_line`: up to
`LONG_LINE_BYTES`), or a token whose text is a number (`number_text`) or an object
(`object_text`). `bytes_sent` counts what it wrote of the last two kinds.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from pathlib import Path

from chat.backends.remote.failover import RemoteOptions
from chat.backends.remote.tgi import TGIBackend
from chat.config import Settings
from tests.helpers import serve_app
from tests.tgi_double import Reply, TGIDouble, _Handler

HEALTHY_TEXT = " ".join(f"word{i}" for i in range(40)) + "."
HUGE_TOKEN = "x" * 1_000_000
ENDLESS_TOKENS = 20_000  # what `endless` sends whatever max_new_tokens asked (then it ends)
LONG_LINE_BYTES = 64 * 1024 * 1024  # the line `long_line` sends (in pieces of 1 MB) without a newline
# Short timeouts so faults show within seconds; one retry while busy. Not shorter: the app, the
# double and the clients share this test process, and late in the whole suite a pause of half a
# second (a full garbage collection, a burst of new clients) once cut a healthy stream as "silent".
QUICK = RemoteOptions(
    connect_timeout_s=2, first_token_timeout_s=2.0, token_timeout_s=2.0, busy_retries=1, backoff_s=0.01
)
ARGS = ("", 0.7, 200, 0.9, 1.0)  # system prompt, temperature, max new tokens, top-p, repetition penalty
_FAULT = re.compile(r"\[fault:(\w+)\]")


class TaggedDouble(TGIDouble):
    bytes_sent = 0

    def reply_for(self, body: dict) -> Reply:
        faults = _FAULT.findall(body.get("inputs", "").rsplit("User:", 1)[-1])
        if not faults:
            return Reply(text=HEALTHY_TEXT)
        fault = faults[-1]
        if fault == "huge_token":
            return Reply(text=f"Here: {HUGE_TOKEN} done")
        return Reply(fail=fault, after_tokens=2)

    def start(self, port: int = 0) -> TaggedDouble:
        from tests.tgi_double import _Server

        self._server = _Server(("127.0.0.1", port), type("Handler", (_TaggedHandler,), {"double": self}))
        self._stopping.clear()
        threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True).start()
        return self


class _TaggedHandler(_Handler):
    def _events(self, body: dict, reply: Reply):
        if reply.fail not in ("malformed", "truncated", "endless", "long_line", "number_text", "object_text"):
            return super()._events(body, reply)
        for index, piece in enumerate(["The", " falcon"]):
            self._token(index, piece, False, None, None, 2)
        if reply.fail == "malformed":
            self._chunk(b'data:{"index": 3, "token": {"id": 7, "te\n\n')
        elif reply.fail == "endless":
            for index in range(2, ENDLESS_TOKENS):
                self._token(index, f" w{index}", False, None, None, index)
                self._sent(40)
        elif reply.fail == "long_line":
            self._chunk(b'data:{"index": 3, "token": {"id": 7, "text": "')
            piece = b"y" * (1024 * 1024)
            for _ in range(LONG_LINE_BYTES // len(piece)):
                self._chunk(piece)
                self._sent(len(piece))
        elif reply.fail in ("number_text", "object_text"):
            text = 5 if reply.fail == "number_text" else {"text": "hidden"}
            self._event({"index": 3, "token": {"id": 7, "text": text, "logprob": 0.0, "special": False}})
        return None  # the stream ends without TGI's final event

    def _sent(self, count: int) -> None:
        self.double.bytes_sent += count


@contextlib.contextmanager
def app_on_double(tokens_per_second: float | None = 50, options: RemoteOptions = QUICK, **settings):
    """The whole app, TGI backend, on a TaggedDouble; yields (url, double)."""
    with TaggedDouble(tokens_per_second=tokens_per_second) as double:
        backend = TGIBackend([double.url], options=options, token=settings.pop("token", None))
        config = Settings(backend="tgi", endpoints=(double.url,), **settings)
        try:
            with serve_app(backend, config) as url:
                yield url, double
        finally:
            backend.close()


def process_figures() -> dict:
    """This process's threads, open file descriptors and RSS (MiB), from /proc."""
    status = Path("/proc/self/status").read_text()
    return {
        "threads": int(re.search(r"Threads:\s+(\d+)", status).group(1)),
        "fds": len(os.listdir("/proc/self/fd")),
        "rss_mib": int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024,
    }


def settled(check, timeout_s: float = 15.0) -> bool:
    """Wait until `check()` holds (background threads ending), polling; False on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()
