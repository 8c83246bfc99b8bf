"""`RemoteBackend`: the backend protocol for a model behind a server, shared by TGI, OpenAI and
SageMaker.

A subclass says how to open one stream on one endpoint (TGI and OpenAI post with `post_stream`),
and (optionally) how the server counts tokens and how long its context is. This class adds
failover (`failover.failover_stream`) and the limits on what a server may send
(`failover.within_limits`), a cache of token counts (the prompt fitter counts every turn of a
conversation again on each message, and each count is an HTTP request), and safe fallbacks:
without a server-side count, a UTF-8 byte count, which is never below the token count of a
byte-level or character-level BPE (every token covers at least one byte), so a prompt fitted with
it cannot overflow.

A server that accepts connections but never answers (hung) costs the connect timeout once: every
request must get its response's first byte within `--connect-timeout` (`first_byte_timeout`; a
stream's tokens then have the first-token timeout), an endpoint that does not is put last in
the pool until a health check finds it answering again, and the questions asked at start-up go
to every endpoint at once, so the first answer wins (`first_answer`).
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import threading
from abc import abstractmethod
from collections.abc import Callable, Generator, Iterator

import httpx2

from chat.backends.remote.failover import (
    EndpointPool,
    RemoteOptions,
    Watchdog,
    error_for_exception,
    error_for_status,
    failover_stream,
    shutdown_response,
    within_limits,
)
from chat.backends.remote.tgi_events import stream_lines
from chat.conversation.backend import Backend, Token
from chat.conversation.errors import BackendError, BackendTimeout, BackendUnavailable
from chat.conversation.params import GenerationParams
from chat.conversation.prompt import ChatMessages, Prompt

log = logging.getLogger(__name__)

DEFAULT_CONTEXT_LENGTH = 2048  # Falcon's context
_SPECIAL_TOKENS_MARGIN = 4  # a BOS/EOS the server's tokenizer may add
TEMPLATE_TOKENS_PER_MESSAGE = 8  # role markers a chat template wraps each message in
MAX_ERROR_BODY = 64 * 1024  # bytes of an error answer read: its message is in the first few
MAX_SIDE_ANSWER = 32 * 1024 * 1024  # bytes of a side route's answer (/tokenize of a long text)


@functools.cache
def shared_tls_context():
    """One TLS context for every per-request HTTP client. Building one reads the whole CA bundle
    (~40 ms of CPU, holding the GIL); per request, at 64 concurrent users, that delayed every
    first token by seconds (bench/load.py)."""
    return httpx2.create_ssl_context()


def http_timeout(options: RemoteOptions) -> httpx2.Timeout:
    return httpx2.Timeout(options.read_timeout_s, connect=options.connect_timeout_s)


def first_byte_timeout(options: RemoteOptions) -> httpx2.Timeout:
    """Connect, send, and have the answer's first byte (its status line) within the connect
    timeout: a hung server is found in seconds. A stream then reads on under `allow_slow_body`."""
    return httpx2.Timeout(options.connect_timeout_s)


def allow_slow_body(response, read_timeout_s: float) -> None:
    """Past its headers, a stream may pause as long as a first token takes (the prefill of a
    long prompt; the watchdog times that precisely). httpx takes the read timeout from the
    request's `timeout` extension when the body starts to be read, which is after this."""
    timeout = response.request.extensions.get("timeout")
    if isinstance(timeout, dict):
        timeout["read"] = read_timeout_s


def auth_headers(token: str | None) -> dict[str, str]:
    """`Authorization` only when there is a token: never "Bearer None"."""
    return {"authorization": f"Bearer {token}"} if token else {}


def read_at_most(response, limit: int) -> bytes:
    """The first `limit` bytes of a streamed response's body (the rest is not read)."""
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) >= limit:
            break
    return bytes(body[:limit])


def error_text(body: bytes) -> str:
    """The error message in a server's JSON error body, else its text."""
    text = body.decode("utf-8", errors="replace")
    try:
        answer = json.loads(text)
        message = answer.get("error") or answer.get("message") or answer.get("detail") or answer
        return str(message.get("message", message) if isinstance(message, dict) else message)
    except Exception:
        return text


def positive_int(value) -> int | None:
    """A length a server reports (a context, a count), None unless it is a whole number above 0."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    try:
        number = int(value)
    except ValueError:
        return None
    return number if number > 0 else None


def estimate_tokens(text: str) -> int:
    """An upper bound on the tokens of `text` for byte- or character-level BPE tokenizers."""
    return len(text.encode("utf-8")) + _SPECIAL_TOKENS_MARGIN


class RemoteBackend(Backend):
    """A Backend whose model runs on one or more servers; see the module docstring."""

    def __init__(
        self,
        endpoints,
        *,
        options: RemoteOptions,
        concurrency_limit: int,
        max_total_tokens: int | None = None,
        token: str | None = None,
        prompt_format=None,
    ):
        self.options = options
        if prompt_format is not None:
            self.prompt_format = prompt_format
        # The servers' side routes (/info, /tokenize, /v1/models), and the streams of backends that
        # speak HTTP themselves. Not the Hub's session: no offline hook. No cap on connections:
        # each streaming reply holds one, and the UI's concurrency limit bounds those.
        self._http = httpx2.Client(
            timeout=http_timeout(options),
            headers=auth_headers(token),
            verify=shared_tls_context(),
            limits=httpx2.Limits(max_connections=None, max_keepalive_connections=concurrency_limit),
        )
        self.pool = EndpointPool(endpoints, options.cooldown_s, probe=self.answers)
        self.concurrency_limit = concurrency_limit
        self._configured_context = max_total_tokens
        self._server_context: int | None = None
        self._server_input_limit: int | None = None  # set where the context's answer tells it
        self._cached_count = functools.lru_cache(maxsize=4096)(self._count_tokens)
        self._cannot_count: set[str] = set()

    # -- what a subclass provides ----------------------------------------------------------------

    @abstractmethod
    def open_stream(
        self, endpoint: str, prompt: str, params: GenerationParams, watchdog: Watchdog
    ) -> Iterator[Token]:
        """A generator of tokens from one endpoint, raising BackendErrors; closing it cancels."""

    def server_context_length(self, endpoint: str) -> int | None:
        """The context the server reports, None when it does not say."""
        return None

    def server_token_count(self, endpoint: str, text: str) -> int | None:
        """The server's own token count of `text`, None when it cannot count."""
        return None

    def health_url(self, endpoint: str) -> str | None:
        """Where the server says it is up; None: no cheap check (then it counts as healthy)."""
        return None

    # -- the protocol ------------------------------------------------------------------------------

    def stream(self, prompt: str, params: GenerationParams) -> Generator[Token, None, None]:
        tokens = failover_stream(
            self.pool,
            self.options,
            lambda endpoint, watchdog: self.open_stream(endpoint, prompt, params, watchdog),
        )
        return within_limits(tokens, params.max_new_tokens)

    def post_stream(self, url: str, body: dict, watchdog: Watchdog) -> Iterator[str]:
        """POST `body` to `url` and yield the lines of its streamed answer; an HTTP error or a
        transport failure as a BackendError. The connection is the stream's own and is closed
        with it (which is how a server hears of a Stop), never a kept-alive one that the server
        may be closing at that moment (a request sent into it fails before the first token)."""
        request = self._http.stream(
            "POST", url, json=body, headers={"Connection": "close"}, timeout=first_byte_timeout(self.options)
        )
        try:
            with request as response:
                watchdog.on_expiry(lambda: shutdown_response(response))
                if response.status_code >= 400:
                    raise error_for_status(
                        response.status_code, error_text(read_at_most(response, MAX_ERROR_BODY))
                    )
                allow_slow_body(response, self.options.read_timeout_s)
                yield from stream_lines(response.iter_bytes())
        except BackendError:
            raise
        except (httpx2.HTTPError, OSError) as error:
            raise error_for_exception(error) from None

    def context_length(self) -> int:
        """The server's context where it says it, else --max-total-tokens, else 2,048.

        A server that is down at start-up is asked again on the next request.
        """
        if self._server_context is None:
            self._server_context = self.first_answer(self.server_context_length)
        return self._server_context or self._configured_context or DEFAULT_CONTEXT_LENGTH

    def max_input_tokens(self) -> int | None:
        """The input limit the server told with its context (TGI's /info), None if it did not."""
        self.context_length()  # asks the server once, and again while it has not answered
        return self._server_input_limit

    def count_tokens(self, text: Prompt) -> int:
        if isinstance(text, ChatMessages):
            # One count for all the contents (one request, not one per message), plus what a
            # template adds per message and before the reply; a template that adds more (a
            # default system prompt) shows as a length error, and the reply loop drops a turn.
            contents = "\n".join(content for _, content in text.messages)
            return self._cached_count(contents) + TEMPLATE_TOKENS_PER_MESSAGE * (len(text.messages) + 1)
        return self._cached_count(text)

    def _count_tokens(self, text: str) -> int:
        def ask(endpoint: str) -> int | None:
            if endpoint in self._cannot_count:
                return None
            counted = self.server_token_count(endpoint, text)
            if counted is None:
                self._cannot_count.add(endpoint)  # no tokenizer route: do not ask it again
            return counted

        counted = self._ask_servers(ask)
        return counted if counted is not None else estimate_tokens(text)

    def healthy(self) -> bool:
        """True when any endpoint answers its health check (or none has one); those cooling down
        are asked last."""
        return any(self.answers(endpoint) for endpoint in self.pool.order(advance=False))

    def answers(self, endpoint: str) -> bool:
        """Whether `endpoint` answers its health check (True where it has none)."""
        url = self.health_url(endpoint)
        if url is None:
            return True
        try:
            return self._http.get(url, timeout=first_byte_timeout(self.options)).status_code < 500
        except (httpx2.HTTPError, OSError):
            return False

    def get_json(self, method: str, url: str, **kwargs):
        """A side route's JSON answer, None when the server has no such route (404, 405, 501);
        other HTTP and connection failures as BackendErrors."""
        for attempt in (1, 2):
            try:
                request = self._http.stream(method, url, timeout=first_byte_timeout(self.options), **kwargs)
                with request as response:
                    body = read_at_most(response, MAX_SIDE_ANSWER)
                break
            except httpx2.RemoteProtocolError as error:
                # A kept-alive connection the server closed as we reused it: these routes are
                # safe to ask again, once, on a new connection.
                if attempt == 2:
                    raise error_for_exception(error) from None
            except (httpx2.HTTPError, OSError) as error:
                raise error_for_exception(error) from None
        if response.status_code in (404, 405, 501):
            return None
        if response.status_code >= 400:
            raise error_for_status(response.status_code, error_text(body[:MAX_ERROR_BODY]))
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            return None  # not JSON: no answer to the question (a count is then estimated)

    def close(self) -> None:
        self._http.close()

    def _ask_servers(self, question):
        """`question(endpoint)` to one endpoint after another (the one in turn first, none that is
        cooling down before the others) until one answers; None if none does. An endpoint that
        cannot be reached, or does not answer in time, goes last."""
        for endpoint in self.pool.order(advance=False):
            try:
                return question(endpoint)
            except BackendError as error:
                self._not_answered(endpoint, error)
        return None

    def first_answer(self, question: Callable[[str], object]):
        """`question(endpoint)` to every endpoint at once; the first answer (not None) wins, and
        one that does not answer delays nothing (start-up asks this way). None if none answers."""
        endpoints = self.pool.order(advance=False)
        answers: queue.Queue = queue.Queue()

        def ask(endpoint: str) -> None:
            try:
                answers.put((endpoint, question(endpoint), None))
            except BackendError as error:
                answers.put((endpoint, None, error))
            except Exception as error:  # never leave the caller waiting
                answers.put((endpoint, None, error))

        for endpoint in endpoints:
            threading.Thread(target=ask, args=(endpoint,), name="endpoint-question", daemon=True).start()
        for _ in endpoints:
            endpoint, answer, error = answers.get()
            if error is not None:
                self._not_answered(endpoint, error)
            elif answer is not None:
                return answer
        return None

    def _not_answered(self, endpoint: str, error: Exception) -> None:
        log.warning("endpoint %s did not answer: %s", endpoint, error)
        if isinstance(error, (BackendUnavailable, BackendTimeout)):
            self.pool.failed(endpoint)
