"""Helpers the tests import: a free loopback port, the real app served on it, a server that records
what it is asked, and the stop filter driven over a list of pieces as the reply loop drives it.

Fixtures live in conftest.py (pytest finds them); plain functions live here, so no test imports
from conftest.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import threading
from collections.abc import Iterable, Iterator

from chat.conversation.stops import StopFilter

# How the browser tests' Chromium is installed, as the README and .ci/run say (Playwright drives
# Debian's build, and needs no driver package).
INSTALL_CHROMIUM = "apt-get install -y chromium"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_app(backend, settings=None):
    """Build the real app for `backend` and serve it on a free loopback port; yields its URL."""
    from chat.config import Settings
    from chat.web.operations import Operations
    from chat.web.page import build_demo, launch_options

    settings = settings or Settings()
    settings = type(settings)(**{**settings.__dict__, "port": free_port()})
    operations = Operations(backend, log_messages=settings.log_messages)
    demo = build_demo(backend, settings, operations)
    demo.launch(**launch_options(settings, operations), prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{settings.port}/"
    finally:
        demo.close()


class RecordingServer:
    """An HTTP server on loopback that answers every request (any method, CONNECT too) with an
    empty `status` and records "METHOD path" for each: an attacker's site, the internet behind a
    proxy."""

    def __init__(self, status: int = 200):
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(self):
                outer.requests.append(f"{self.command} {self.path}")
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            do_GET = do_POST = do_HEAD = do_PUT = do_CONNECT = answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True, name="recording-server").start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def filter_stream(pieces: Iterable[str], stop_sequences: Iterable[str]) -> Iterator[str]:
    """Yield the growing text to show; stop reading `pieces` at the first stop sequence."""
    stop_filter = StopFilter(stop_sequences)
    for piece in pieces:
        if stop_filter.push(piece):
            yield stop_filter.text
        if stop_filter.stopped:
            return
    before = stop_filter.text
    if stop_filter.finish() != before:
        yield stop_filter.text


def reply_with_stats(
    backend, message="Hi", history=(), system_prompt="", params=None, **options
) -> tuple[list[str], object]:
    """Every text `chat.conversation.reply.stream_reply` shows for one message, and the reply's stats."""
    from chat.conversation.params import GenerationParams
    from chat.conversation.reply import stream_reply

    finished = []
    texts = list(
        stream_reply(
            backend,
            message,
            list(history),
            system_prompt,
            params or GenerationParams(),
            max_message_chars=20_000,
            on_finish=finished.append,
            **options,
        )
    )
    return texts, finished[-1]


def rest_call(url: str, api: str, raw: str, timeout: float = 30) -> tuple[int, str | None, object]:
    """Gradio's REST route with a raw JSON body (NaN and infinity allowed): (POST status, event,
    data); a refused POST gives its JSON body, or its text where it has none."""
    import httpx

    with httpx.Client(base_url=url, timeout=timeout) as http:
        posted = http.post(
            f"gradio_api/call/{api}", content=raw, headers={"content-type": "application/json"}
        )
        if posted.status_code != 200:
            try:
                return posted.status_code, None, posted.json()
            except ValueError:
                return posted.status_code, None, posted.text
        event, payload = None, None
        with http.stream("GET", f"gradio_api/call/{api}/{posted.json()['event_id']}") as events:
            for line in events.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event in ("complete", "error"):
                    payload = json.loads(line[5:])
                    break
        return posted.status_code, event, payload


def fake_tinygemm_pack(swapped, tiles):
    import torch

    """Stands in for `_convert_weight_to_int4pack` (CUDA only): a fixed scramble of each tile of
    8 x 16*tiles levels into int32 words, shaped as tinygemm's [out/8, in/(16*tiles), 32, tiles/2]."""
    levels = torch.stack((swapped >> 4, swapped & 15), dim=-1).reshape(swapped.shape[0], -1)
    rows, columns = levels.shape
    width = 16 * tiles
    tiles_of = (
        levels.view(rows // 8, 8, columns // width, width)
        .transpose(1, 2)
        .reshape(rows // 8, columns // width, -1)
    )
    scramble = torch.randperm(8 * width, generator=torch.Generator().manual_seed(tiles))
    slots = tiles_of[..., scramble].to(torch.int32).view(rows // 8, columns // width, -1, 8)
    words = sum(slots[..., j] << (4 * j) for j in range(8))
    return words.view(rows // 8, columns // width, 32, tiles // 2)


def decode(decoder, input_ids, params, seed=0, stop_after=None) -> tuple[list[int], str]:
    """A decoder's tokens and finish reason for one reply; Stop pressed once `stop_after` came."""
    tokens = []
    reason = decoder.generate(
        input_ids, params, seed, tokens.append, lambda: stop_after is not None and len(tokens) >= stop_after
    )
    return tokens, reason
