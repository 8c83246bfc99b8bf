"""Running the app: `/healthz`, Prometheus `/metrics`, and one structured log line per reply.

The routes are served by the same process as the page (passed to Gradio's FastAPI app when it is
created). Logs never contain message text unless `--log-messages` asks for it, and never secrets:
an `Operations` puts chat.conversation.log_safety in front of every log record of the process
(ours and every library's): scrubbed, escaped, each record one line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from chat.conversation.backend import Backend
from chat.conversation.log_safety import REQUEST_LOG, install, json_line, log_text

request_log = logging.getLogger(REQUEST_LOG)
start_log = logging.getLogger("falcon_chat")

SERVER_DOWN = (
    "⚠️ The model server does not answer right now: messages will fail until it does. "
    "Reload the page to check again."
)

_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Operations:
    """Metrics and logs for one app; its own registry, so several apps can live in one process."""

    def __init__(self, backend: Backend, *, log_messages: bool = False):
        self.backend = backend
        self.log_messages = log_messages
        install(log_messages=log_messages)  # every record of the process, whoever makes it
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "falcon_chat_requests", "Replies by outcome.", ["mode", "outcome"], registry=self.registry
        )
        self.errors = Counter("falcon_chat_errors", "Errors by kind.", ["kind"], registry=self.registry)
        self.tokens = Counter("falcon_chat_generated_tokens", "Tokens generated.", registry=self.registry)
        self.time_to_first_token = Histogram(
            "falcon_chat_time_to_first_token_seconds",
            "Time to first token.",
            buckets=_SECONDS,
            registry=self.registry,
        )
        self.duration = Histogram(
            "falcon_chat_reply_duration_seconds",
            "Time for a whole reply.",
            buckets=_SECONDS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "falcon_chat_replies_in_flight", "Replies being generated now.", registry=self.registry
        )
        self.queue_depth = Gauge(
            "falcon_chat_queue_depth", "Requests waiting in the queue.", registry=self.registry
        )
        self._queue_size = lambda: 0

    def server_state(self) -> str:
        """A sentence for the page while the backend cannot serve (its server is down), else ""."""
        return "" if self.backend.healthy() else SERVER_DOWN

    def watch_queue(self, size: Callable[[], int]) -> None:
        """Report the depth of the page's queue, `size()` (read when /metrics is scraped; Gradio's
        queue is read in chat/web/gradio_patches/queue.py)."""
        self._queue_size = size

    def record_reply(self, mode: str, stats, message: str | None = None) -> None:
        self.requests.labels(mode, stats.finish_reason).inc()
        self.tokens.inc(stats.generated_tokens)
        if stats.error_kind:
            self.errors.labels(stats.error_kind).inc()
        if stats.time_to_first_token_s is not None:
            self.time_to_first_token.observe(stats.time_to_first_token_s)
        self.duration.observe(stats.duration_s)
        line = {
            "event": "reply",
            "mode": mode,
            "backend": self.backend.name,
            "model": self.backend.model_name,
            **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.as_dict().items()},
        }
        if getattr(stats, "error_detail", None):
            # A server's error can repeat what it was sent: withheld then, unless --log-messages.
            private = () if self.log_messages else (message or "",)
            line["error_detail"] = log_text(stats.error_detail, private=private)
        if self.log_messages and message is not None:
            line["message"] = message
        request_log.info(json_line(line))

    def record_rejected(self, mode: str, kind: str) -> None:
        """A request refused before generation (bad settings, message too long, ...)."""
        self.requests.labels(mode, "rejected").inc()
        self.errors.labels(kind).inc()
        request_log.info(json_line({"event": "rejected", "mode": mode, "kind": kind}))

    # -- routes ----------------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [Route("/healthz", self._healthz), Route("/metrics", self._metrics)]

    async def _healthz(self, request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        healthy = await run_in_threadpool(self.backend.healthy)
        body = {
            "status": "ok" if healthy else "unavailable",
            "backend": self.backend.name,
            "model": self.backend.model_name,
        }
        return JSONResponse(body, status_code=200 if healthy else 503)

    async def _metrics(self, request: Request) -> Response:
        self.queue_depth.set(self._queue_size())
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


def log_start(backend: Backend, endpoints=()) -> None:
    """The start-up log: which model, through what, in which format, what to know about it, and a
    server that does not answer (so the log says it before the first message does)."""
    start_log.info(
        "model: %s, through %s, in %s", backend.model_name, backend.name, backend.prompt_format.description
    )
    if backend.notice:
        start_log.info("%s", backend.notice.replace("`", "").replace("⚠️ ", ""))
    if not backend.healthy():
        start_log.warning(
            "no model server answers at %s: the page says so, and messages fail until one does",
            log_text(", ".join(endpoints)),
        )
