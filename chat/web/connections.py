"""What one client may hold of the server: connections, time to send a request, requests a second.

Measured before (issue #24): 5,000 slow connections from one client were held for as long as it
liked; at the file-descriptor limit chat and /healthz stopped answering, and 3,000 requests at
88 a second slowed a normal chat to 10 s. uvicorn, which Gradio runs, closes idle kept-alive
connections, but waits forever for a request's headers and body, and limits nothing per client.

- `GuardedHTTPProtocol` (uvicorn's own HTTP protocol, with two checks) refuses a connection from
  an address that already holds `--connections-per-client`, and closes a connection whose request
  has not arrived whole, headers and body, `--request-timeout` seconds after the connection (or
  the previous response) began.
- `RateLimitMiddleware` answers HTTP 429 to an address (the client a trusted proxy forwarded
  for) past `--requests-per-second`, after a burst of ten seconds' worth. A request that starts
  work in Gradio's queue (a reply: `/gradio_api/queue/join`, `/gradio_api/call/...`) counts as
  `QUEUED_COST` requests: what floods the server is replies, not requests (20 chat requests a
  second still slowed a normal chat to 4 s on two cores). A page load (83 requests), typing (a
  settings save per keystroke) and a chat (one queued request and ~10 others) stay far below it.
- Addresses uvicorn trusts as proxies (FORWARDED_ALLOW_IPS, uvicorn's own setting; 127.0.0.1
  unless set) are not limited per address: their connections carry many clients, and their
  requests are counted for the client they forward for. On a Hugging Face Space (SPACE_ID set),
  reachable only through Hugging Face's proxy, every address is trusted unless the operator
  says otherwise: the limits then count the forwarded address, which a client could forge.

Gradio starts uvicorn itself (`gradio.http_server.start_server`) with no way to pass a protocol,
so `install_connection_guard` points uvicorn's "auto" protocol name at `GuardedHTTPProtocol`; it
checks at start-up that the name it replaces exists (checked with uvicorn 0.55). The limits travel
with the app: the protocol finds them in the app's middleware list (`RateLimitMiddleware`'s).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import uvicorn.config
from starlette.middleware import Middleware
from uvicorn.protocols.http.auto import AutoHTTPProtocol

log = logging.getLogger(__name__)

PROTOCOL = "chat.web.connections:GuardedHTTPProtocol"
BURST_SECONDS = 10  # a client may spend this many seconds' worth of requests at once
QUEUED_COST = 10  # a request that queues a reply counts as this many
_QUEUED = ("/gradio_api/queue/join", "/gradio_api/call/")


@dataclass
class ClientLimits:
    """The limits for one app, and the counts they are checked against."""

    request_timeout_s: float
    connections_per_client: int  # 0: none
    requests_per_second: int  # 0: none
    _open: dict[str, int] = field(default_factory=dict)
    _buckets: dict[str, list[float]] = field(default_factory=dict)  # address -> [tokens, when]
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def open_connection(self, address: str) -> bool:
        """Count a new connection from `address`; False (not counted) when it holds the most."""
        with self._lock:
            held = self._open.get(address, 0)
            if self.connections_per_client and held >= self.connections_per_client:
                return False
            self._open[address] = held + 1
            return True

    def close_connection(self, address: str) -> None:
        with self._lock:
            held = self._open.get(address, 0) - 1
            if held > 0:
                self._open[address] = held
            else:
                self._open.pop(address, None)

    def allow_request(self, address: str, now: float, cost: int = 1) -> bool:
        """Take `cost` requests from `address`'s bucket (refilled at `requests_per_second`)."""
        if not self.requests_per_second:
            return True
        capacity = self.requests_per_second * BURST_SECONDS
        with self._lock:
            tokens, when = self._buckets.get(address, (capacity, now))
            tokens = min(capacity, tokens + (now - when) * self.requests_per_second)
            if len(self._buckets) > 100_000:  # full buckets say nothing: forget them
                self._buckets = {a: b for a, b in self._buckets.items() if b[0] < capacity}
            if tokens < cost:
                self._buckets[address] = [tokens, now]
                return False
            self._buckets[address] = [tokens - cost, now]
            return True


class RateLimitMiddleware:
    """ASGI middleware: HTTP 429 for an address past its requests per second (see the module
    docstring); it also carries the app's `ClientLimits` to `GuardedHTTPProtocol`."""

    def __init__(self, app, limits: ClientLimits, clock=time.monotonic):
        self.app = app
        self.limits = limits
        self.clock = clock

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        address = (scope.get("client") or ("",))[0]
        path = scope.get("path", "")
        queued = scope.get("method") == "POST" and any(route in path for route in _QUEUED)
        cost = QUEUED_COST if queued else 1
        if trusted(address, trusted_addresses()) or self.limits.allow_request(address, self.clock(), cost):
            return await self.app(scope, receive, send)
        log.warning("too many requests from %s: answered 429", address)
        body = json.dumps(
            {"error": "Too many requests from this address. Please try again in a moment."}
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"retry-after", b"1"),
        ]
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def client_middleware(limits: ClientLimits) -> list[Middleware]:
    return [Middleware(RateLimitMiddleware, limits=limits)]


def limits_of(config) -> ClientLimits | None:
    """The limits of the app that uvicorn `config` serves (None: an app without them)."""
    cached = config.__dict__.get("falcon_chat_limits", False)
    if cached is False:
        cached = next(
            (
                m.kwargs["limits"]
                for m in getattr(config.app, "user_middleware", ())
                if getattr(m, "cls", None) is RateLimitMiddleware
            ),
            None,
        )
        config.__dict__["falcon_chat_limits"] = cached
    return cached


def trusted_addresses(config=None) -> set[str]:
    """The proxies uvicorn trusts (its `forwarded_allow_ips`, from FORWARDED_ALLOW_IPS)."""
    allowed = getattr(config, "forwarded_allow_ips", None) or os.environ.get(
        "FORWARDED_ALLOW_IPS", "127.0.0.1"
    )
    if isinstance(allowed, str):
        allowed = allowed.split(",")
    return {address.strip() for address in allowed}


def trusted(address: str | None, addresses: set[str]) -> bool:
    return address is None or "*" in addresses or address in addresses


class GuardedHTTPProtocol(AutoHTTPProtocol):
    """uvicorn's HTTP protocol, with a limit on connections per address and on the time a request
    takes to arrive (see the module docstring)."""

    _limits: ClientLimits | None = None
    _address: str | None = None  # counted against its address's limit
    _deadline = None
    _previous = None  # the request whose response ended when the deadline was set

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._limits = limits_of(self.config)
        if self._limits is None:
            return
        address = (self.client or (None,))[0]
        if not trusted(address, trusted_addresses(self.config)):
            if not self._limits.open_connection(address):
                log.warning(
                    "client %s already holds %d connections: another was refused",
                    address,
                    self._limits.connections_per_client,
                )
                self.transport.close()
                return
            self._address = address
        self._arm(previous=None)

    def connection_lost(self, exc) -> None:
        if self._address is not None:
            self._limits.close_connection(self._address)
            self._address = None
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        finished = self.cycle
        super().on_response_complete()
        self._arm(previous=finished)  # the next request on this connection has its own time

    def handle_websocket_upgrade(self, event) -> None:
        self._disarm()  # the connection is another protocol's from here
        super().handle_websocket_upgrade(event)

    def _arm(self, previous) -> None:
        self._disarm()
        if self._limits is not None and not self.transport.is_closing():
            self._previous = previous
            self._deadline = self.loop.call_later(self._limits.request_timeout_s, self._deadline_passed)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if cycle is not None and cycle is not self._previous and not cycle.more_body:
            return  # the request arrived whole in time; its answer may take as long as it takes
        if not self.transport.is_closing():
            self.transport.close()  # its headers or its body are still on their way: too slow


def install_connection_guard() -> None:
    """Have uvicorn serve with `GuardedHTTPProtocol` (for apps that carry `ClientLimits`; others
    are served as before). Fails loudly if uvicorn no longer resolves protocols by that name."""
    protocols = getattr(uvicorn.config, "HTTP_PROTOCOLS", None)
    if not isinstance(protocols, dict) or "auto" not in protocols:
        raise RuntimeError(
            f"uvicorn {uvicorn.__version__} has no HTTP_PROTOCOLS['auto']: chat/web/connections.py "
            "cannot limit connections per client (checked with uvicorn 0.55)"
        )
    protocols["auto"] = PROTOCOL
    if os.environ.get("SPACE_ID"):  # behind Hugging Face's proxy: see the module docstring
        os.environ.setdefault("FORWARDED_ALLOW_IPS", "*")
