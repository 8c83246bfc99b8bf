"""`RemoteBackend`: the backend protocol for a model behind a server, shared by TGI, OpenAI and
SageMaker.

A subclass says how to open one stream on one endpoint, and (optionally) how the server counts
tokens and how long its context is. This class adds failover (`failover.failover_stream`), a cache
of token counts (the prompt fitter counts every turn of a conversation again on each message, and
each count is an HTTP request), and safe fallbacks: without a server-side count, a UTF-8 byte count,
which is never below the token count of a byte-level or character-level BPE (every token covers at
least one byte), so a prompt fitted with it cannot overflow.
"""

from __future__ import annotations

import functools
import logging
from abc import abstractmethod
from collections.abc import Generator, Iterator

import httpx2

from chat.backends.remote.failover import (
    EndpointPool,
    RemoteOptions,
    Watchdog,
    error_for_exception,
    error_for_status,
    failover_stream,
)
from chat.conversation.backend import Backend, Token
from chat.conversation.errors import BackendError
from chat.conversation.log_safety import log_text
from chat.conversation.params import GenerationParams
from chat.conversation.prompt import ChatMessages, Prompt

log = logging.getLogger(__name__)

DEFAULT_CONTEXT_LENGTH = 2048  # Falcon's context
_SPECIAL_TOKENS_MARGIN = 4  # a BOS/EOS the server's tokenizer may add
TEMPLATE_TOKENS_PER_MESSAGE = 8  # role markers a chat template wraps each message in


@functools.cache
def shared_tls_context():
    """One TLS context for every per-request HTTP client. Building one reads the whole CA bundle
    (~40 ms of CPU, holding the GIL); per request, at 64 concurrent users, that delayed every
    first token by seconds (bench/load.py)."""
    return httpx2.create_ssl_context()


def http_timeout(options: RemoteOptions) -> httpx2.Timeout:
    return httpx2.Timeout(options.read_timeout_s, connect=options.connect_timeout_s)


def auth_headers(token: str | None) -> dict[str, str]:
    """`Authorization` only when there is a token: never "Bearer None"."""
    return {"authorization": f"Bearer {token}"} if token else {}


def error_text(response) -> str:
    """The error message in a server's JSON error body, else its text."""
    try:
        body = response.json()
        message = body.get("error") or body.get("message") or body.get("detail") or body
        return str(message.get("message", message) if isinstance(message, dict) else message)
    except Exception:
        return response.text


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
        self.pool = EndpointPool(endpoints, options.cooldown_s)
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
        return failover_stream(
            self.pool,
            self.options,
            lambda endpoint, watchdog: self.open_stream(endpoint, prompt, params, watchdog),
        )

    def context_length(self) -> int:
        """The server's context where it says it, else --max-total-tokens, else 2,048.

        A server that is down at start-up is asked again on the next request.
        """
        if self._server_context is None:
            self._server_context = self._ask_servers(self.server_context_length)
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
        """True when any endpoint answers its health check (or none has one)."""
        urls = [url for endpoint in self.pool.endpoints if (url := self.health_url(endpoint))]
        for url in urls:
            try:
                if self._http.get(url, timeout=self.options.connect_timeout_s).status_code < 500:
                    return True
            except (httpx2.HTTPError, OSError):
                continue
        return not urls

    def get_json(self, method: str, url: str, **kwargs):
        """A side route's JSON answer, None when the server has no such route (404, 405, 501);
        other HTTP and connection failures as BackendErrors."""
        for attempt in (1, 2):
            try:
                response = self._http.request(method, url, **kwargs)
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
            raise error_for_status(response.status_code, error_text(response))
        return response.json()

    def close(self) -> None:
        self._http.close()

    def _ask_servers(self, question):
        for endpoint in self.pool.order():
            try:
                return question(endpoint)
            except BackendError as error:
                log.warning("endpoint %s did not answer: %s", log_text(endpoint), error)
        return None
