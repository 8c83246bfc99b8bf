"""What every remote backend shares: endpoint failover, retries, timeouts, limits and error mapping.

A remote backend only knows how to open one stream on one endpoint (`open_stream(endpoint,
watchdog)`, a generator of `Token`s) and which library error means what. Everything else lives
here, once:

- `EndpointPool` spreads requests round-robin (each reply advances the turn once; questions on
  the side, such as token counts, do not) and puts an endpoint that refused, failed or hung
  before its first token last for `cooldown_s`. When the cooldown ends, a background check
  (`probe`, the server's health route) brings it back only if it answers, so no user's request
  waits on an endpoint that is still down.
- `failover_stream` tries the endpoints until one produces a first token; "busy" answers (429,
  TGI's `overloaded`) are retried with exponential backoff before giving up with `BackendBusy`.
  Once a token has been shown, nothing is retried: the user would see the reply restart.
- `Watchdog` enforces the first-token and between-token timeouts on the wall clock. A read
  timeout on the socket is not enough: TGI sends keep-alive comments while it is silent, and
  those reset any socket timeout. When a deadline passes, the watchdog shuts the socket down
  (`shutdown`, not `close`: only shutdown wakes a read blocked in another thread), the blocked
  read fails, and the failure is reported as `BackendTimeout`.
- `within_limits` ends a reply where the server goes past what it was asked for: more tokens
  than `max_new_tokens`, or more than `MAX_REPLY_CHARS` of text.
- `error_for_status`, `error_for_event` and `error_for_exception` turn HTTP statuses, TGI-style
  error events and library exceptions into the kinds in `chat.conversation.errors`.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass

from chat.conversation import cancellation
from chat.conversation.backend import FINISH_LENGTH, Token
from chat.conversation.errors import (
    BackendBusy,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ContextOverflow,
    GenerationFailed,
    RequestRejected,
)

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_FIRST_TOKEN_TIMEOUT_S = 120.0  # a long prompt on a busy server takes a while to prefill
DEFAULT_TOKEN_TIMEOUT_S = 30.0
DEFAULT_BUSY_RETRIES = 3
DEFAULT_BACKOFF_S = 0.5
DEFAULT_COOLDOWN_S = 30.0
# A reply's text is cut here whatever the server sends: the page sends a conversation back with
# each message, under a 2 MiB request limit, so a longer reply could not even be answered.
MAX_REPLY_CHARS = 1024 * 1024
# Events without text a stream may carry beyond its tokens (a role chunk, the end-of-text token,
# usage): more than this past `max_new_tokens` is a server that does not stop.
EXTRA_EVENTS = 64

# How servers word "prompt + reply is longer than my context" (TGI, vLLM, SGLang, OpenAI).
_LENGTH_ERROR = re.compile(
    r"max_total_tokens|max_new_tokens|max_tokens|must have less than|context length|"
    r"maximum model length|model_max_length|too long|input_length|exceeds? the",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class RemoteOptions:
    """Timeouts and retry policy shared by the remote backends (see the README)."""

    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    first_token_timeout_s: float = DEFAULT_FIRST_TOKEN_TIMEOUT_S
    token_timeout_s: float = DEFAULT_TOKEN_TIMEOUT_S
    busy_retries: int = DEFAULT_BUSY_RETRIES
    backoff_s: float = DEFAULT_BACKOFF_S
    cooldown_s: float = DEFAULT_COOLDOWN_S

    @property
    def read_timeout_s(self) -> float:
        """Socket read timeout: a backstop for silence, the watchdog does the precise part."""
        return max(self.first_token_timeout_s, self.token_timeout_s) + 1.0


class EndpointPool:
    """Round-robin over endpoints; one that failed is tried last until it answers again (see the
    module docstring). `probe(endpoint) -> bool`, run in a thread of its own once a cooldown ends,
    says whether it does; without one, an endpoint is back in turn when its cooldown ends."""

    def __init__(
        self,
        endpoints,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
        probe: Callable[[str], bool] | None = None,
    ):
        if not endpoints:
            raise ValueError("at least one endpoint is needed")
        self.endpoints = tuple(endpoints)
        self.cooldown_s = cooldown_s
        self.probe = probe
        self._clock = clock
        self._turn = 0
        self._failed_until: dict[str, float] = {}
        self._probing: set[str] = set()
        self._lock = threading.Lock()

    def order(self, *, advance: bool = True) -> list[str]:
        """Endpoints to try for one request: the one in turn first, failed ones last. A reply's
        stream advances the turn (`advance`), a question on the side does not."""
        now = self._clock()
        with self._lock:
            start = self._turn % len(self.endpoints)
            self._turn += advance
            due = [e for e, until in self._failed_until.items() if until <= now and e not in self._probing]
            if self.probe is None:
                for endpoint in due:
                    del self._failed_until[endpoint]
                due = []
            self._probing.update(due)
            failed = set(self._failed_until)
        for endpoint in due:
            threading.Thread(target=self._check, args=(endpoint,), name="endpoint-probe", daemon=True).start()
        rotated = self.endpoints[start:] + self.endpoints[:start]
        return [e for e in rotated if e not in failed] + [e for e in rotated if e in failed]

    def failed(self, endpoint: str) -> None:
        with self._lock:
            self._failed_until[endpoint] = self._clock() + self.cooldown_s

    def succeeded(self, endpoint: str) -> None:
        with self._lock:
            self._failed_until.pop(endpoint, None)

    def cooling(self) -> set[str]:
        """The endpoints tried last now."""
        with self._lock:
            return set(self._failed_until)

    def _check(self, endpoint: str) -> None:
        try:
            answers = self.probe(endpoint)
        except Exception:
            answers = False
        with self._lock:
            self._probing.discard(endpoint)
        (self.succeeded if answers else self.failed)(endpoint)


class Watchdog:
    """Calls the registered abort once a deadline passes without `arm` having moved it."""

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._deadline = clock() + timeout_s
        self._abort: Callable[[], None] | None = None
        self._stopped = False
        self.expired = False
        self._wakes_at: float | None = None  # when the watcher wakes by itself; None: only on notify
        self._condition = threading.Condition()
        threading.Thread(target=self._watch, name="remote-watchdog", daemon=True).start()

    def on_expiry(self, abort: Callable[[], None]) -> None:
        """Register how to interrupt the current read (called once the response exists)."""
        with self._condition:
            self._abort = abort
            expired = self.expired
        if expired:
            _quietly(abort)

    def arm(self, timeout_s: float) -> None:
        """A new deadline, `timeout_s` from now."""
        with self._condition:
            self._deadline = self._clock() + timeout_s
            # Per token the deadline only moves later: the watcher, due to wake earlier anyway, need
            # not be woken (a wake-up per token per stream costs GIL hand-offs under load).
            if self._wakes_at is None or self._deadline < self._wakes_at:
                self._condition.notify()

    def pause(self) -> None:
        """No deadline while the reader holds a token: only waiting for the server is timed."""
        with self._condition:
            self._deadline = None

    def stop(self) -> None:
        with self._condition:
            self._stopped = True
            self._condition.notify()

    def expire_now(self) -> None:
        """Interrupt the read now (the reply was cancelled: nobody waits for its tokens)."""
        with self._condition:
            if self._stopped or self.expired:
                return
            self.expired = True
            self._stopped = True
            abort = self._abort
            self._condition.notify()
        if abort is not None:
            _quietly(abort)

    def _watch(self) -> None:
        with self._condition:
            while not self._stopped:
                if self._deadline is None:
                    self._wakes_at = None
                    self._condition.wait()
                    continue
                remaining = self._deadline - self._clock()
                if remaining <= 0:
                    self.expired = True
                    break
                self._wakes_at = self._deadline
                self._condition.wait(remaining)
            abort = self._abort if self.expired else None
        if abort is not None:
            _quietly(abort)


def shutdown_response(response) -> None:
    """Interrupt a read blocked on an httpx/httpx2 response from another thread."""
    stream = getattr(response, "extensions", {}).get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        sock.shutdown(socket.SHUT_RDWR)
    else:
        response.close()


def failover_stream(
    pool: EndpointPool,
    options: RemoteOptions,
    open_stream: Callable[[str, Watchdog], Iterator[Token]],
    sleep: Callable[[float], None] = time.sleep,
) -> Generator[Token, None, None]:
    """Tokens from the first endpoint that produces one; see the module docstring."""
    error: BackendError | None = None
    cancelled = cancellation.current.get()  # the reply's, when it can interrupt a blocked read
    for attempt in range(options.busy_retries + 1):
        if attempt:
            sleep(options.backoff_s * 2 ** (attempt - 1))
        busy: BackendBusy | None = None
        for endpoint in pool.order(advance=attempt == 0):
            if cancelled is not None and cancelled.is_set():
                return
            stream = _EndpointStream(endpoint, open_stream, options.first_token_timeout_s, cancelled)
            try:
                first = stream.next_token()
            except BackendError as failure:
                stream.close()
                if not failure.retryable:
                    raise
                log.warning("endpoint %s failed before its first token: %s", endpoint, failure)
                if isinstance(failure, BackendBusy):
                    busy = failure  # up, but full: no cooldown, and "busy" is what the user hears
                else:
                    error = failure
                    pool.failed(endpoint)
                continue
            except BaseException:
                stream.close()
                raise
            try:
                if first is None and cancelled is not None and cancelled.is_set():
                    return
                pool.succeeded(endpoint)
                token = first
                while token is not None:
                    stream.watchdog.pause()
                    yield token
                    stream.watchdog.arm(options.token_timeout_s)
                    token = stream.next_token()
            finally:
                stream.close()  # closes the HTTP response: the server stops generating
            return
        if busy is None:
            break  # every endpoint is down: waiting here would only delay the message
    raise busy or error or BackendUnavailable(detail="no endpoint answered")


class _EndpointStream:
    """One endpoint's token stream with its watchdog, and the cancellation hooked to it; `close`
    undoes all three, on every way out."""

    def __init__(self, endpoint: str, open_stream, first_token_timeout_s: float, cancelled):
        self.watchdog = Watchdog(first_token_timeout_s)
        self.tokens = open_stream(endpoint, self.watchdog)
        self.cancelled = cancelled
        self._forget = cancelled.on_set(self.watchdog.expire_now) if cancelled is not None else _nothing

    def next_token(self) -> Token | None:
        """The next token; None at the end, or when the read was interrupted by a cancellation."""
        try:
            return next(self.tokens, None)
        except Exception as error:
            if self.cancelled is not None and self.cancelled.is_set():
                return None  # interrupted on purpose: the stream simply ends
            if self.watchdog.expired:
                raise BackendTimeout(detail="no token within the timeout") from error
            if isinstance(error, BackendError):
                raise
            raise error_for_exception(error) from error

    def close(self) -> None:
        self._forget()
        self.watchdog.stop()
        self.tokens.close()


def within_limits(tokens: Iterator[Token], max_new_tokens: int) -> Generator[Token, None, None]:
    """`tokens`, ended (and closed: the server stops) where a server goes past what it was asked
    for: after `max_new_tokens` tokens of text, `EXTRA_EVENTS` more events, or `MAX_REPLY_CHARS`
    of text. The reply then ends as a length-limited one."""
    texts = events = chars = 0
    try:
        for token in tokens:
            events += 1
            texts += bool(token.text)
            chars += len(token.text)
            if chars > MAX_REPLY_CHARS:
                yield Token(
                    token.text[: len(token.text) - (chars - MAX_REPLY_CHARS)], finish_reason=FINISH_LENGTH
                )
                return
            yield token
            if token.finish_reason:
                return
            if texts >= max_new_tokens or events >= max_new_tokens + EXTRA_EVENTS:
                yield Token("", finish_reason=FINISH_LENGTH)
                return
    finally:
        close = getattr(tokens, "close", None)
        if close is not None:
            close()


def error_for_status(status: int, message: str = "") -> BackendError:
    """The error kind for an HTTP status (before any token arrived)."""
    detail = f"HTTP {status}: {message[:300]}"
    if status == 429:
        return BackendBusy(detail=detail)
    if status in (400, 413, 422):
        if _LENGTH_ERROR.search(message):
            return ContextOverflow(detail=detail)
        return RequestRejected(detail=detail)
    if status in (401, 403):
        return BackendUnavailable(
            "The model server refused this app's credentials. Please tell the administrator.",
            detail=detail,
        )
    if status >= 500:
        failure = (
            BackendUnavailable(detail=detail) if status in (502, 503) else GenerationFailed(detail=detail)
        )
        failure.retryable = True  # another endpoint may well answer
        return failure
    return GenerationFailed(detail=detail)


def error_for_event(error_type: str | None, message: str) -> BackendError:
    """The error kind for a TGI-style error event (`{"error": ..., "error_type": ...}`)."""
    detail = f"{error_type or 'error'}: {message[:300]}"
    if error_type == "overloaded":
        return BackendBusy(detail=detail)
    if error_type in (None, "validation") and _LENGTH_ERROR.search(message):
        return ContextOverflow(detail=detail)
    if error_type == "validation":
        return RequestRejected(detail=detail)
    return GenerationFailed(detail=detail)


def error_for_exception(error: BaseException) -> BackendError:
    """The error kind for a transport-level failure (refused, timed out, cut off)."""
    chain = []
    while error is not None and len(chain) < 10:
        chain.append(error)
        error = error.__cause__ or error.__context__
    names = " ".join(type(e).__name__ for e in chain)
    detail = f"{type(chain[0]).__name__}: {str(chain[0])[:200]}"
    if "Timeout" in names or any(isinstance(e, TimeoutError) for e in chain):
        return BackendTimeout(detail=detail)
    if "Connect" in names or any(isinstance(e, ConnectionRefusedError) for e in chain):
        return BackendUnavailable(detail=detail)
    failure = GenerationFailed(
        "The connection to the model server broke off. Please try again.", detail=detail
    )
    failure.retryable = True  # before the first token another endpoint may answer
    return failure


def _nothing() -> None:
    pass


def _quietly(action: Callable[[], None]) -> None:
    try:
        action()
    except Exception:  # the socket may already be closed; the reader handles that
        pass
