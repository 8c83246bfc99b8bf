"""What the reliability tests share: the TGI double answering by a tag in the message, and the whole
app served on it.

`TaggedDouble` stands in for a TGI server whose failures hit one user and not another: a message
containing `[fault:NAME]` gets that failure (every attempt, so retries cannot hide it), any other
message the healthy `HEALTHY_TEXT`. Besides the double's own failures it can send a malformed event
(`malformed`), end the stream cleanly without TGI's final event (`truncated`) or stream a token of
1 MB (`huge_token`).
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
# Short timeouts so faults show within seconds; one retry while busy. Not shorter: the app, the
# double and the clients share this test process, and late in the whole suite a pause of half a
# second (a full garbage collection, a burst of new clients) once cut a healthy stream as "silent".
QUICK = RemoteOptions(
    connect_timeout_s=2, first_token_timeout_s=2.0, token_timeout_s=2.0, busy_retries=1, backoff_s=0.01
)
ARGS = ("", 0.7, 200, 0.9, 1.0)  # system prompt, temperature, max new tokens, top-p, repetition penalty
_FAULT = re.compile(r"\[fault:(\w+)\]")


class TaggedDouble(TGIDouble):
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
        if reply.fail not in ("malformed", "truncated"):
            return super()._events(body, reply)
        for index, piece in enumerate(["The", " falcon"]):
            self._token(index, piece, False, None, None, 2)
        if reply.fail == "malformed":
            self._chunk(b'data:{"index": 3, "token": {"id": 7, "te\n\n')
        return None  # the stream ends without TGI's final event


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
