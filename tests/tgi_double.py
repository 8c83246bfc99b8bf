"""A stand-in for a Text Generation Inference server (router 3.3.x), for tests and benchmarks.

TGI needs a GPU and cannot run here. This is a real HTTP/1.1 server on a loopback port that speaks
TGI's wire format as its router (3.3.x) sends it:

- POST /generate_stream (and POST / with `"stream": true`): chunked `text/event-stream`, one event
  per token `data:{"index", "token": {...}, "generated_text": null, "details": null}` (`data:` with
  or without the space, `data_prefix`), a blank line after each, `:` keep-alive comments while
  silent (`keepalive_s`), the last event with `generated_text` and `details`; errors as in-stream
  events `{"error", "error_type"}` under HTTP 200; no `[DONE]`.
- POST /v1/chat/completions (TGI's Messages API, `"stream": true`): the messages go through a
  ChatML-like template (`<|im_start|>role\ncontent<|im_end|>`, as TGI applies the model's), the
  reply streams as chat-completion chunks (`choices[0].delta.content`), the last with its
  `finish_reason`, then `data: [DONE]`; validation errors answer HTTP 422 before the stream.
- GET /info (`max_input_tokens`, `max_total_tokens`, ...), POST /tokenize (one token per word,
  `tokenize=False` answers 404 like an old TGI), GET /health.
- TGI's validation, with its error texts: temperature > 0, 0 < top_p < 1, max_new_tokens > 0,
  at most 4 stop sequences, input <= max_input_tokens, input + max_new_tokens <= max_total_tokens.
  It honours `stop` (the matched sequence stays in the text) and `max_new_tokens`.

It records every request (`requests`) and every client that went away before its reply ended
(`disconnects`, `wait_for_disconnects`) and how many streams were open at once
(`peak_active`), streams at `tokens_per_second` if set, and takes scripted
replies (`script(Reply(...))`) that can fail in each way a real server does: HTTP 429 or 5xx,
in-stream overloaded/validation/generation errors, silence before the first token or mid-stream,
or the connection killed mid-stream. A server that refuses connections is one that is stopped.
"""

from __future__ import annotations

import collections
import json
import re
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DEFAULT_TEXT = "The falcon flies over the city at dawn, and the river shines below it."
END_OF_TEXT = "<|endoftext|>"
_WORDS = re.compile(r"\s*\S+|\s+")


def tokenize(text: str) -> list[str]:
    """The double's tokenizer: a word with the spaces before it is one token."""
    return _WORDS.findall(text)


def chat_template(messages: list[dict]) -> str:
    """The text a ChatML-templated model sees for `messages`, ending with the assistant's turn."""
    turns = "".join(f"<|im_start|>{m.get('role')}\n{m.get('content')}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


@dataclass
class Reply:
    """One scripted reply. `fail` names a failure; mid-stream ones happen after `after_tokens`."""

    text: str = DEFAULT_TEXT
    fail: str | None = None  # http_429 | http_500 | http_503 | overloaded | validation |
    #                          silent_before | silent_mid | killed_mid | error_mid
    after_tokens: int = 2
    error: str | None = None  # the text of a validation or error_mid event
    finish_reason: str = "eos_token"  # when the text runs out before max_new_tokens


@dataclass
class RecordedRequest:
    method: str
    path: str
    body: dict | None
    headers: dict = field(default_factory=dict)


class TGIDouble:
    """Start with `start()` (or `with TGIDouble() as tgi:`), point clients at `url`."""

    def __init__(
        self,
        *,
        tokens_per_second: float | None = None,
        max_input_tokens: int = 1024,
        max_total_tokens: int = 2048,
        data_prefix: str = "data:",
        keepalive_s: float = 0.05,
        tokenize: bool = True,
        model_id: str = "tiiuae/falcon-180B-chat",
    ):
        self.tokens_per_second = tokens_per_second
        self.max_input_tokens = max_input_tokens
        self.max_total_tokens = max_total_tokens
        self.data_prefix = data_prefix
        self.keepalive_s = keepalive_s
        self.tokenize = tokenize
        self.model_id = model_id
        self.requests: list[RecordedRequest] = []
        self.disconnects = 0
        self.completed = 0
        self.active = 0  # streams open now
        self.peak_active = 0  # the most streams that were open at once
        self._script: collections.deque[Reply] = collections.deque()
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    # -- control -----------------------------------------------------------------------------------

    def start(self, port: int = 0) -> TGIDouble:
        handler = type("Handler", (_Handler,), {"double": self})
        self._server = _Server(("127.0.0.1", port), handler)
        self._stopping.clear()
        threading.Thread(
            target=self._server.serve_forever, args=(0.02,), daemon=True, name="tgi-double"
        ).start()
        return self

    def stop(self) -> None:
        """Stop listening (new connections are refused) and end every open stream."""
        self._stopping.set()
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server.close_connections()  # kept-alive connections too: the server is gone

    def __enter__(self) -> TGIDouble:
        return self if self._server else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def script(self, *replies: Reply) -> None:
        """Replies for the next requests, in order; after them, the default reply."""
        self._script.extend(replies)

    def generate_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path in ("/", "/generate_stream")]

    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == "/v1/chat/completions"]

    def wait_for_disconnects(self, count: int, timeout: float = 5.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.disconnects >= count, timeout)

    def _record(self, attribute: str, step: int = 1) -> None:
        with self._changed:
            setattr(self, attribute, getattr(self, attribute) + step)
            self.peak_active = max(self.peak_active, self.active)
            self._changed.notify_all()

    def reply_for(self, body: dict) -> Reply:
        """The reply to one /generate_stream request; override to answer by the prompt."""
        return self._next_reply()

    def stream_started(self, body: dict) -> object:
        """Called as a /generate_stream answer starts; its result goes to `token_sent` (benchmarks
        time the server side through these two)."""
        return None

    def token_sent(self, stream: object, special: bool) -> None:
        """Called after each token event of the stream that `stream_started` returned `stream` for."""

    def _next_reply(self) -> Reply:
        try:
            return self._script.popleft()
        except IndexError:
            return Reply()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the listen backlog: a load test connects 64+ clients at once

    def __init__(self, *args, **kwargs):
        self.connections: set = set()
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address):
        self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """What a killed server does to its clients: every open connection is cut."""
        for connection in list(self.connections):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Disconnected(Exception):
    """The client went away before the reply ended."""


class _Stopped(Exception):
    """The double is stopping; open streams end without their final event."""


class _Handler(BaseHTTPRequestHandler):
    double: TGIDouble
    _stream: object = None  # what double.stream_started returned for the stream being sent
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate small writes: with Nagle's algorithm on, the second
    # waits for the client's delayed ACK (~40 ms), which a real TGI server does not add.
    disable_nagle_algorithm = True

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        self._recorded(None)
        if self.path == "/info":
            d = self.double
            self._json(
                200,
                {
                    "model_id": d.model_id,
                    "model_dtype": "torch.bfloat16",
                    "router": "text-generation-router",
                    "version": "3.3.6",
                    "max_input_tokens": d.max_input_tokens,
                    "max_total_tokens": d.max_total_tokens,
                    "max_stop_sequences": 4,
                    "max_concurrent_requests": 128,
                    "max_best_of": 2,
                    "validation_workers": 2,
                },
            )
        elif self.path == "/health":
            self._json(200, {})
        else:
            self._json(404, {"error": "Not Found", "error_type": "not_found"})

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length) or b"null")
        self._recorded(body)
        if self.path == "/tokenize" and self.double.tokenize:
            spans, start = [], 0
            for i, piece in enumerate(tokenize(body["inputs"])):
                spans.append({"id": i, "text": piece, "start": start, "stop": start + len(piece)})
                start += len(piece)
            self._json(200, spans)
        elif self.path == "/generate_stream" or (self.path == "/" and body.get("stream")):
            self._generate_stream(body)
        elif self.path == "/v1/chat/completions":
            self._chat_stream(body)
        else:
            self._json(404, {"error": "Not Found", "error_type": "not_found"})

    # -- /generate_stream ----------------------------------------------------------------------

    def _generate_stream(self, body: dict) -> None:
        self._stream = self.double.stream_started(body)
        reply = self.double.reply_for(body)
        if reply.fail and reply.fail.startswith("http_"):
            status = int(reply.fail[5:])
            error_type = "overloaded" if status == 429 else "generation"
            self._json(
                status,
                {
                    "error": reply.error or ("Model is overloaded" if status == 429 else "Internal error"),
                    "error_type": error_type,
                },
            )
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.send_header("cache-control", "no-cache")
        self.end_headers()
        self.double._record("active")
        try:
            self._events(body, reply)
            self._chunk(b"")  # the chunked body's end
            self.double._record("completed")
        except _Disconnected:
            self.double._record("disconnects")
        except _Stopped:
            pass
        finally:
            self.double._record("active", -1)
        self.close_connection = True

    def _chat_stream(self, body: dict) -> None:
        """TGI's Messages API: its template applied, the reply as chat-completion chunks."""
        inputs = chat_template(body.get("messages") or [])
        parameters = {"max_new_tokens": body.get("max_tokens"), "stop": body.get("stop")}
        error = self._validation_error({"inputs": inputs, "parameters": parameters})
        if error:
            return self._json(422, {"error": error, "error_type": "validation"})
        reply = self.double.reply_for(body)
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        max_tokens = body.get("max_tokens") or 20
        pieces = tokenize(reply.text)[:max_tokens]
        try:
            for index, piece in enumerate(pieces):
                last = index == len(pieces) - 1
                finish = ("length" if len(pieces) == max_tokens else "stop") if last else None
                chunk = {
                    "object": "chat.completion.chunk",
                    "model": self.double.model_id,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": piece},
                            "logprobs": None,
                            "finish_reason": finish,
                        }
                    ],
                }
                self._event(chunk)
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")
        except _Disconnected:
            self.double._record("disconnects")
        self.close_connection = True

    def _events(self, body: dict, reply: Reply) -> None:
        error = self._validation_error(body)
        if error or reply.fail == "validation":
            return self._event(
                {
                    "error": error
                    or reply.error
                    or "Input validation error: `inputs` "
                    "tokens + `max_new_tokens` must be <= 2048. Given: 2000 `inputs` "
                    "tokens and 100 `max_new_tokens`",
                    "error_type": "validation",
                }
            )
        if reply.fail == "overloaded":
            return self._event({"error": "Model is overloaded", "error_type": "overloaded"})
        if reply.fail == "silent_before":
            return self._wait(None)
        parameters = body.get("parameters") or {}
        max_new_tokens = parameters.get("max_new_tokens") or 20
        stops = parameters.get("stop") or []
        pieces = tokenize(reply.text)[:max_new_tokens]
        finish, generated = reply.finish_reason, ""
        if len(pieces) == max_new_tokens:
            finish = "length"
        for index, piece in enumerate(pieces):
            if index == reply.after_tokens and reply.fail in ("silent_mid", "killed_mid", "error_mid"):
                if reply.fail == "silent_mid":
                    return self._wait(None)
                if reply.fail == "killed_mid":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    raise _Disconnected  # counted as a disconnect: the stream did not end
                return self._event(
                    {
                        "error": reply.error or "Request failed during generation: CUDA out of memory",
                        "error_type": "generation",
                    }
                )
            generated += piece
            stopped = any(stop in generated for stop in stops)
            last = stopped or (index == len(pieces) - 1 and finish == "length")
            self._token(
                index,
                piece,
                False,
                generated if last else None,
                ("stop_sequence" if stopped else finish) if last else None,
                len(pieces),
            )
            if last:
                return None
            self._wait(1 / self.double.tokens_per_second if self.double.tokens_per_second else 0)
        self._token(len(pieces), END_OF_TEXT, True, generated, finish, len(pieces) + 1)

    def _token(self, index, text, special, generated_text, finish_reason, count):
        details = None
        if finish_reason:
            details = {"finish_reason": finish_reason, "generated_tokens": count, "seed": None}
        self._event(
            {
                "index": index + 1,
                "token": {"id": 100 + index, "text": text, "logprob": -0.25, "special": special},
                "generated_text": generated_text,
                "details": details,
                "top_tokens": None,
            }
        )
        self.double.token_sent(self._stream, special)

    def _validation_error(self, body: dict) -> str | None:
        """TGI's checks and wording (router/src/validation.rs)."""
        p = body.get("parameters") or {}
        d = self.double
        inputs = len(tokenize(body.get("inputs", "")))
        max_new = p.get("max_new_tokens") or 20
        if p.get("temperature") is not None and p["temperature"] <= 0:
            return "Input validation error: `temperature` must be strictly positive"
        if p.get("top_p") is not None and not 0 < p["top_p"] < 1:
            return "Input validation error: `top_p` must be > 0.0 and < 1.0"
        if max_new <= 0:
            return "Input validation error: `max_new_tokens` must be strictly positive"
        if len(p.get("stop") or []) > 4:
            return f"Input validation error: `stop` supports up to 4 stop sequences. Given: {len(p['stop'])}"
        if inputs > d.max_input_tokens:
            return (
                f"Input validation error: `inputs` must have less than {d.max_input_tokens} "
                f"tokens. Given: {inputs}"
            )
        if inputs + max_new > d.max_total_tokens:
            return (
                f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= "
                f"{d.max_total_tokens}. Given: {inputs} `inputs` tokens and {max_new} "
                "`max_new_tokens`"
            )
        return None

    # -- writing, waiting, noticing a client that left ---------------------------------------------

    def _event(self, payload: dict) -> None:
        self._chunk(f"{self.double.data_prefix}{json.dumps(payload)}\n\n".encode())

    def _chunk(self, data: bytes) -> None:
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except OSError:
            raise _Disconnected from None

    def _wait(self, seconds: float | None) -> None:
        """Wait (None: until the double stops), sending keep-alives; notice a client leaving."""
        end = None if seconds is None else time.monotonic() + seconds
        while not self.double._stopping.is_set():
            left = (
                self.double.keepalive_s
                if end is None
                else min(end - time.monotonic(), self.double.keepalive_s)
            )
            if left <= 0:
                return
            readable, _, _ = select.select([self.connection], [], [], left)
            if readable and not self._peek():
                raise _Disconnected
            if end is None:
                self._chunk(b":\n\n")  # keep-alive comment, as TGI sends while silent
        raise _Stopped  # the double is stopping: end the stream abruptly

    def _peek(self) -> bytes:
        try:
            return self.connection.recv(1, socket.MSG_PEEK)
        except OSError:  # reset by the client: gone as much as a clean close
            return b""

    def _json(self, status: int, payload) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _recorded(self, body) -> None:
        self.double.requests.append(
            RecordedRequest(self.command, self.path, body, {k.lower(): v for k, v in self.headers.items()})
        )


if __name__ == "__main__":  # python -m tests.tgi_double --port 8080: try the app's --backend tgi by hand
    import argparse

    parser = argparse.ArgumentParser(description="Serve the TGI protocol double on loopback.")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--tokens-per-second", type=float, default=20.0)
    arguments = parser.parse_args()
    double = TGIDouble(tokens_per_second=arguments.tokens_per_second).start(arguments.port)
    print(f"TGI double on {double.url} (Ctrl-C stops it)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        double.stop()
