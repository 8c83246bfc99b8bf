"""Configuration: command-line flags, each with an environment variable, read in one place.

Defaults work offline: with nothing set, the app serves the tiny demo Falcon built on first start.
A bad value stops the start with one line (`ConfigError`), not a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from chat.conversation.errors import ConfigError
from chat.conversation.params import DEFAULT_STOP_SEQUENCES, MAX_STOP_SEQUENCES, GenerationParams
from chat.conversation.prompt import PROMPT_FORMATS
from chat.conversation.stops import decode_escapes, split_unescaped_commas

BACKENDS = ("local", "tgi", "openai", "sagemaker")
QUANTIZATIONS = ("8bit", "4bit", "int4")  # 8bit/4bit: bitsandbytes; int4: our fast path
DECODERS = ("auto", "plain", "fast")  # auto: fast on a CUDA GPU where the model allows, else plain
DEFAULT_PORT = 7860
DEFAULT_MAX_MESSAGE_CHARS = 20_000
DEFAULT_REMOTE_CONCURRENCY = 64
DEFAULT_QUEUE_SIZE = 100  # requests waiting for a free slot; more get "busy, try again"
# Page updates per second, all streaming replies together (chat.web.bridge.UpdatePacer): one reply
# alone updates at every token (up to 50 a second); 64 at once, every 0.32 s each.
DEFAULT_PAGE_UPDATES = 200
DEFAULT_MAX_REQUEST_BYTES = 2 * 1024 * 1024  # a long conversation's history, with room to spare
DEFAULT_REQUEST_TIMEOUT_S = 30.0  # a client sends a request's headers and body within this
DEFAULT_CONNECTIONS_PER_CLIENT = 32  # a browser opens at most 6; chat/web/connections.py
DEFAULT_REQUESTS_PER_SECOND = 20  # per client, with bursts of 10 seconds' worth

# flag -> environment variable; the README's configuration table lists the same pairs.
ENVIRONMENT = {
    "backend": "BACKEND",
    "model": "MODEL_ID",
    "endpoint": "ENDPOINT",
    "host": "GRADIO_SERVER_NAME",
    "port": "GRADIO_SERVER_PORT",
    "system_prompt": "SYSTEM_PROMPT",
    "quantize": "QUANTIZE",
    "save_quantized": "SAVE_QUANTIZED",
    "max_total_tokens": "MAX_TOTAL_TOKENS",
    "stop": "STOP_SEQUENCES",
    "max_message_chars": "MAX_MESSAGE_CHARS",
    "concurrency": "CONCURRENCY_LIMIT",
    "queue_size": "QUEUE_SIZE",
    "page_updates": "PAGE_UPDATES",
    "token": "HF_TOKEN",
    "log_messages": "LOG_MESSAGES",
    "api_key": "OPENAI_API_KEY",
    "connect_timeout": "CONNECT_TIMEOUT",
    "first_token_timeout": "FIRST_TOKEN_TIMEOUT",
    "token_timeout": "TOKEN_TIMEOUT",
    "busy_retries": "BUSY_RETRIES",
    "endpoint_cooldown": "ENDPOINT_COOLDOWN",
    "decoder": "DECODER",
    "tensor_parallel": "TENSOR_PARALLEL",
    "prompt_format": "PROMPT_FORMAT",
    "allow_embed_from": "ALLOW_EMBED_FROM",
    "max_request_bytes": "MAX_REQUEST_BYTES",
    "request_timeout": "REQUEST_TIMEOUT",
    "connections_per_client": "CONNECTIONS_PER_CLIENT",
    "requests_per_second": "REQUESTS_PER_SECOND",
}


@dataclass(frozen=True)
class Settings:
    """Everything the app is configured with. Secrets are kept out of `repr` (and so of logs)."""

    backend: str = "local"
    model: str | None = None  # hub id or folder; None: the tiny offline demo model
    endpoints: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    system_prompt: str = ""
    quantize: str | None = None
    save_quantized: str | None = None  # folder to write the int4 weights to (--quantize int4)
    max_total_tokens: int | None = None
    stop_sequences: tuple[str, ...] = DEFAULT_STOP_SEQUENCES
    max_message_chars: int = DEFAULT_MAX_MESSAGE_CHARS
    concurrency_limit: int | None = None  # None: 1 for the local backend, 64 for remote ones
    queue_size: int = DEFAULT_QUEUE_SIZE  # requests that may wait; a full queue turns new ones away
    page_updates: int = DEFAULT_PAGE_UPDATES  # streamed updates per second, all replies together
    token: str | None = field(default=None, repr=False)
    log_messages: bool = False  # put message text in the request log (off: privacy)
    api_key: str | None = field(default=None, repr=False)  # for OpenAI-compatible servers
    # Remote backends (None: the defaults in chat/backends/remote/failover.py).
    connect_timeout_s: float | None = None
    first_token_timeout_s: float | None = None
    token_timeout_s: float | None = None  # longest silence between two tokens
    busy_retries: int | None = None
    endpoint_cooldown_s: float | None = None
    decoder: str = "auto"  # local backend's decode loop: auto | plain | fast
    tensor_parallel: int | str = 1  # GPUs that share each layer: a number, or "auto" (all, if needed)
    prompt_format: str = "auto"  # falcon | template | auto (chat.conversation.prompt)
    allow_embed_from: tuple[str, ...] = ()  # origins that may frame the page; () = any
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # larger request bodies get HTTP 413
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S  # slower clients are disconnected
    connections_per_client: int = DEFAULT_CONNECTIONS_PER_CLIENT  # 0: no limit
    requests_per_second: int = DEFAULT_REQUESTS_PER_SECOND  # per client; 0: no limit

    @property
    def default_params(self) -> GenerationParams:
        return GenerationParams(stop_sequences=self.stop_sequences)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit 2
        raise ConfigError(message)


def _parser() -> _Parser:
    env = lambda name: f" (env {ENVIRONMENT[name]})"  # noqa: E731
    p = _Parser(prog="app.py", description="Falcon Chat: a chat web app for Falcon models.")
    p.add_argument("--backend", choices=BACKENDS, help="where tokens come from" + env("backend"))
    p.add_argument("--model", help="hub id or local folder of the model" + env("model"))
    p.add_argument(
        "--endpoint",
        action="append",
        help="server address for remote backends; repeat for several" + env("endpoint"),
    )
    p.add_argument("--host", help="address to listen on" + env("host"))
    p.add_argument("--port", help="port to listen on" + env("port"))
    p.add_argument("--system-prompt", help="default system prompt" + env("system_prompt"))
    p.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        help="8bit or 4bit: bitsandbytes (CUDA only); int4: the fast decoder's weight-only int4, "
        "quantized while loading" + env("quantize"),
    )
    p.add_argument(
        "--save-quantized",
        help="with --quantize int4: save the int4 model to this folder" + env("save_quantized"),
    )
    p.add_argument("--max-total-tokens", help="model context in tokens" + env("max_total_tokens"))
    p.add_argument(
        "--stop",
        action="append",
        help="stop sequence; repeat for several, replaces the defaults" + env("stop"),
    )
    p.add_argument("--max-message-chars", help="longest message accepted" + env("max_message_chars"))
    p.add_argument("--concurrency", help="generations at once" + env("concurrency"))
    p.add_argument("--queue-size", help="requests that may wait for a turn" + env("queue_size"))
    p.add_argument(
        "--page-updates", help="streamed updates per second, all replies together" + env("page_updates")
    )
    p.add_argument("--token", help="access token for the hub or server" + env("token"))
    p.add_argument(
        "--log-messages",
        action="store_true",
        default=None,
        help="log message text with each request" + env("log_messages"),
    )
    p.add_argument("--api-key", help="API key for an OpenAI-compatible server" + env("api_key"))
    p.add_argument("--connect-timeout", help="seconds to connect to a server" + env("connect_timeout"))
    p.add_argument(
        "--first-token-timeout", help="seconds to wait for the first token" + env("first_token_timeout")
    )
    p.add_argument("--token-timeout", help="seconds of silence between tokens" + env("token_timeout"))
    p.add_argument("--busy-retries", help="retries while the server is busy" + env("busy_retries"))
    p.add_argument(
        "--endpoint-cooldown", help="seconds a failed endpoint is skipped" + env("endpoint_cooldown")
    )
    p.add_argument("--decoder", help="local decode loop: auto, plain or fast" + env("decoder"))
    p.add_argument(
        "--tensor-parallel",
        help="GPUs sharing each layer: N, or auto (every GPU when the model needs them)"
        + env("tensor_parallel"),
    )
    p.add_argument(
        "--prompt-format",
        help="falcon, template (the model's chat template) or auto (template where the model has one)"
        + env("prompt_format"),
    )
    p.add_argument(
        "--allow-embed-from",
        action="append",
        help="origins that may frame the page, comma-separated; default any" + env("allow_embed_from"),
    )
    p.add_argument("--max-request-bytes", help="largest request body accepted" + env("max_request_bytes"))
    p.add_argument(
        "--request-timeout",
        help="seconds a client has to send a request's headers and body" + env("request_timeout"),
    )
    p.add_argument(
        "--connections-per-client",
        help="connections one address may hold open; 0: any" + env("connections_per_client"),
    )
    p.add_argument(
        "--requests-per-second",
        help="requests per second one address may make; 0: any" + env("requests_per_second"),
    )
    return p


def load_settings(argv: Sequence[str] | None = None, environ=None) -> Settings:
    """Settings from flags, then environment variables, then defaults."""
    environ = os.environ if environ is None else environ
    args = vars(_parser().parse_args(argv))

    def value(name: str):
        given = args.get(name)
        if given not in (None, []):
            return given
        return environ.get(ENVIRONMENT[name]) or None

    endpoints = value("endpoint")
    if isinstance(endpoints, str):  # from the environment: comma-separated
        endpoints = [e for e in endpoints.split(",")]
    stops = value("stop")
    if isinstance(stops, str):  # from the environment: comma-separated (`\,` for a comma)
        stops = split_unescaped_commas(stops)
    stops = [decode_escapes(stop) for stop in stops or ()]
    settings = Settings(
        backend=value("backend") or "local",
        model=value("model"),
        endpoints=tuple(e.strip() for e in endpoints or () if e.strip()),
        host=value("host") or "127.0.0.1",
        port=_int("--port", value("port"), DEFAULT_PORT, 1, 65535),
        system_prompt=value("system_prompt") or "",
        quantize=value("quantize"),
        save_quantized=value("save_quantized"),
        max_total_tokens=_int("--max-total-tokens", value("max_total_tokens"), None, 16, 10**7),
        stop_sequences=tuple(stops) if stops else DEFAULT_STOP_SEQUENCES,
        max_message_chars=_int(
            "--max-message-chars", value("max_message_chars"), DEFAULT_MAX_MESSAGE_CHARS, 1, 10**7
        ),
        concurrency_limit=_int("--concurrency", value("concurrency"), None, 1, 10_000),
        queue_size=_int("--queue-size", value("queue_size"), DEFAULT_QUEUE_SIZE, 1, 100_000),
        page_updates=_int("--page-updates", value("page_updates"), DEFAULT_PAGE_UPDATES, 1, 100_000),
        token=value("token"),
        log_messages=str(value("log_messages") or "").lower() in ("1", "true", "yes", "on"),
        api_key=value("api_key"),
        connect_timeout_s=_seconds("--connect-timeout", value("connect_timeout")),
        first_token_timeout_s=_seconds("--first-token-timeout", value("first_token_timeout")),
        token_timeout_s=_seconds("--token-timeout", value("token_timeout")),
        busy_retries=_int("--busy-retries", value("busy_retries"), None, 0, 20),
        endpoint_cooldown_s=_seconds("--endpoint-cooldown", value("endpoint_cooldown")),
        decoder=value("decoder") or "auto",
        tensor_parallel=_tensor_parallel(value("tensor_parallel")),
        prompt_format=value("prompt_format") or "auto",
        allow_embed_from=parse_origins(value("allow_embed_from")),
        max_request_bytes=_int(
            "--max-request-bytes", value("max_request_bytes"), DEFAULT_MAX_REQUEST_BYTES, 1024, 2**31
        ),
        request_timeout_s=_seconds("--request-timeout", value("request_timeout"))
        or DEFAULT_REQUEST_TIMEOUT_S,
        connections_per_client=_int(
            "--connections-per-client",
            value("connections_per_client"),
            DEFAULT_CONNECTIONS_PER_CLIENT,
            0,
            100_000,
        ),
        requests_per_second=_int(
            "--requests-per-second", value("requests_per_second"), DEFAULT_REQUESTS_PER_SECOND, 0, 100_000
        ),
    )
    _check(settings)
    return settings


def _int(flag: str, raw, default, low: int, high: int):
    if raw is None:
        return default
    try:
        number = int(str(raw).strip())
    except ValueError:
        raise ConfigError(f"{flag} must be a whole number, not {raw!r}") from None
    if not low <= number <= high:
        raise ConfigError(f"{flag} must be between {low} and {high}, not {number}")
    return number


def _tensor_parallel(raw) -> int | str:
    if raw is not None and str(raw).strip().lower() == "auto":
        return "auto"
    try:
        return _int("--tensor-parallel", raw, 1, 1, 64)
    except ConfigError:
        raise ConfigError(
            f"--tensor-parallel must be a number of GPUs (1 to 64) or auto, not {raw!r}"
        ) from None


def _seconds(flag: str, raw) -> float | None:
    if raw is None:
        return None
    try:
        seconds = float(str(raw).strip())
    except ValueError:
        raise ConfigError(f"{flag} must be a number of seconds, not {raw!r}") from None
    if not 0 < seconds <= 86_400:
        raise ConfigError(f"{flag} must be more than 0 and at most 86400 seconds, not {raw}")
    return seconds


def _check(settings: Settings) -> None:
    if settings.backend not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, not {settings.backend!r}")
    if settings.decoder not in DECODERS:
        raise ConfigError(f"--decoder must be one of {', '.join(DECODERS)}, not {settings.decoder!r}")
    if settings.prompt_format not in PROMPT_FORMATS:
        raise ConfigError(
            f"--prompt-format must be one of {', '.join(PROMPT_FORMATS)}, not {settings.prompt_format!r}"
        )
    if settings.quantize not in (None, *QUANTIZATIONS):
        raise ConfigError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, not {settings.quantize!r}")
    if settings.save_quantized and settings.quantize != "int4":
        raise ConfigError("--save-quantized needs --quantize int4")
    if settings.backend != "local" and not settings.endpoints:
        raise ConfigError(f"--backend {settings.backend} needs --endpoint (env ENDPOINT)")
    if len(settings.stop_sequences) > MAX_STOP_SEQUENCES:
        raise ConfigError(f"at most {MAX_STOP_SEQUENCES} stop sequences (--stop) are allowed")
    try:
        _ = settings.default_params  # builds and checks the stop sequences
    except Exception as error:
        raise ConfigError(f"--stop: {getattr(error, 'user_message', error)}") from None


# A CSP source expression a person would write for a page that frames the app: a scheme
# (`https:`), or an optional scheme, a host (optionally `*.`-prefixed) and an optional port.
# Quotes, spaces, commas and semicolons are refused: they would change the header's meaning.
_ORIGIN = re.compile(
    r"""
    (?:[a-z][a-z0-9+.-]*:)                                 # a scheme alone: https:
    |
    (?:[a-z][a-z0-9+.-]*://)?                              # optional scheme
    (?:\*|(?:\*\.)?[a-z0-9-]+(?:\.[a-z0-9-]+)*)            # host, *.host or *
    (?::(?:[0-9]{1,5}|\*))?                                # optional port
    """,
    re.IGNORECASE | re.VERBOSE,
)


def parse_origins(raw: str | Iterable[str] | None) -> tuple[str, ...]:
    """Origins from `--allow-embed-from` (comma-separated, or repeated), checked; () if none."""
    if raw is None:
        return ()
    parts = raw.split(",") if isinstance(raw, str) else [p for item in raw for p in item.split(",")]
    origins = []
    for part in parts:
        origin = part.strip()
        if not origin:
            continue
        if origin.endswith("/") and "://" in origin and origin.count("/") == 3:
            origin = origin[:-1]  # "https://example.com/" as copied from the address bar
        if not _ORIGIN.fullmatch(origin):
            raise ConfigError(
                f"--allow-embed-from: {origin!r} is not an origin like https://example.com, "
                "https://*.example.com or https:"
            )
        origins.append(origin)
    return tuple(dict.fromkeys(origins))
