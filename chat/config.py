"""Configuration: every setting declared once, as a `Settings` field with its `Flag`.

From those fields come the command-line parser, the environment variables, the defaults `--help`
shows and the README's table (`flag_table`, checked by tests/test_config.py). Defaults work
offline: with nothing set, the app serves a small real model (SmolLM2-135M-Instruct) on the CPU.
A bad value stops the start with one line (`ConfigError`), not a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from chat.conversation.errors import ConfigError
from chat.conversation.params import DEFAULT_STOP_SEQUENCES, MAX_STOP_SEQUENCES, GenerationParams
from chat.conversation.prompt import PROMPT_FORMATS
from chat.conversation.stops import decode_escapes, split_unescaped_commas

BACKENDS = ("local", "tgi", "openai", "sagemaker")
HTTP_BACKENDS = ("tgi", "openai")  # their endpoints are URLs; SageMaker's are names
QUANTIZATIONS = ("8bit", "4bit", "int4")  # 8bit/4bit: bitsandbytes; int4: our fast path
DECODERS = ("auto", "plain", "fast")
SPECULATIONS = ("off", "ngram", "draft")  # chat/engine/speculation.py
DEFAULT_MODEL_SHOWN = "SmolLM2-135M-Instruct"  # chat/backends/local/default_model.py builds it
DEFAULT_REMOTE_CONCURRENCY = 64
# Page updates per second, all streaming replies together (chat.web.bridge.UpdatePacer): one reply
# alone updates at every token (up to 50 a second); 64 at once, every 0.32 s each.
DEFAULT_PAGE_UPDATES = 200
DEFAULT_MAX_REQUEST_BYTES = 2 * 1024 * 1024  # a long conversation's history, with room to spare
DEFAULT_REQUEST_TIMEOUT_S = 30.0  # a client sends a request's headers and body within this
DEFAULT_CONNECTIONS_PER_CLIENT = 32  # a browser opens at most 6; chat/web/connections.py
DEFAULT_REQUESTS_PER_SECOND = 20  # per client, with bursts of 10 seconds' worth
# Exit status of a refused start: 2, as argparse uses for a bad command line.
EXIT_BAD_CONFIGURATION = 2

Reader = Callable[[str, object], object]  # (flag, raw value) -> value, or ConfigError


@dataclass(frozen=True)
class Flag:
    """How one setting is given: a flag, an environment variable, and what it means."""

    name: str  # --flag
    env: str
    help: str  # one plain sentence for --help and the README's table
    read: Reader = lambda flag, raw: str(raw)  # noqa: E731
    choices: tuple[str, ...] = ()
    repeat: bool = False  # the flag may be repeated; the variable is comma-separated
    switch: bool = False  # a flag without a value; the variable is on/off
    shown_default: str | None = None  # where the field's value is not what a person should read
    metavar: str = "VALUE"  # what --help shows after the flag; choices show themselves


def setting(default, flag: Flag, **options):
    """A `Settings` field with its flag."""
    return dataclasses.field(default=default, metadata={"flag": flag}, **options)


# -- readers: raw text (or a repeated flag's list) to a value, naming the flag when it is wrong -----


def _choice(choices: Sequence[str]) -> Reader:
    def read(flag, raw):
        value = str(raw).strip().lower()
        if value not in choices:
            raise ConfigError(f"{flag} must be one of {', '.join(choices)}, not {raw!r}")
        return value

    return read


def _whole_number(low: int, high: int) -> Reader:
    def read(flag, raw):
        try:
            number = int(str(raw).strip())
        except ValueError:
            raise ConfigError(f"{flag} must be a whole number, not {raw!r}") from None
        if not low <= number <= high:
            raise ConfigError(f"{flag} must be between {low} and {high}, not {number}")
        return number

    return read


def _seconds(flag, raw) -> float:
    try:
        seconds = float(str(raw).strip())
    except ValueError:
        raise ConfigError(f"{flag} must be a number of seconds, not {raw!r}") from None
    if not 0 < seconds <= 86_400:
        raise ConfigError(f"{flag} must be more than 0 and at most 86400 seconds, not {raw}")
    return seconds


def _tensor_parallel(flag, raw) -> int | str:
    if str(raw).strip().lower() == "auto":
        return "auto"
    try:
        return _whole_number(1, 64)(flag, raw)
    except ConfigError:
        raise ConfigError(f"{flag} must be a number of GPUs (1 to 64) or auto, not {raw!r}") from None


def _items(raw) -> list[str]:
    """A repeated flag's values, or a variable's comma-separated ones, each also split at commas."""
    values = [raw] if isinstance(raw, str) else list(raw)
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _stops(flag, raw) -> tuple[str, ...]:
    parts = split_unescaped_commas(raw) if isinstance(raw, str) else raw  # `\,` for a comma
    return tuple(decode_escapes(stop) for stop in parts if stop)


def _switch(flag, raw) -> bool:
    if raw is True:
        return True
    value = str(raw).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{flag} is on or off (1 or 0), not {raw!r}")


def _text(flag, raw) -> str:
    return str(raw)


def _origins(flag, raw) -> tuple[str, ...]:
    return parse_origins(raw)


@dataclass(frozen=True)
class Settings:
    """Everything the app is configured with. Secrets are kept out of `repr` (and so of logs)."""

    backend: str = setting(
        "local",
        Flag(
            "--backend",
            "BACKEND",
            "where replies come from: local (a model in this process), or a server: tgi, openai "
            "(any OpenAI-compatible server: vLLM, SGLang, transformers serve) or sagemaker, each with --endpoint",
            _choice(BACKENDS),
            choices=BACKENDS,
        ),
    )
    model: str | None = setting(
        None,
        Flag(
            "--model",
            "MODEL_ID",
            "local: a hub id (tiiuae/falcon-7b-instruct) or a model folder; openai: the served model's name",
            _text,
            shown_default=f"{DEFAULT_MODEL_SHOWN}, offline",
            metavar="ID_OR_FOLDER",
        ),
    )
    endpoints: tuple[str, ...] = setting(
        (),
        Flag(
            "--endpoint",
            "ENDPOINT",
            "a server's address (http://host:port) for tgi and openai, an endpoint name for sagemaker; "
            "repeat the flag, or comma-separate, for several",
            lambda flag, raw: tuple(_items(raw)),
            repeat=True,
            shown_default="none",
            metavar="URL",
        ),
    )
    host: str = setting(
        "127.0.0.1",
        Flag(
            "--host",
            "GRADIO_SERVER_NAME",
            "address to listen on (0.0.0.0 to serve others)",
            _text,
            metavar="ADDRESS",
        ),
    )
    port: int = setting(
        7860,
        Flag("--port", "GRADIO_SERVER_PORT", "port to listen on", _whole_number(1, 65535), metavar="PORT"),
    )
    system_prompt: str = setting(
        "",
        Flag(
            "--system-prompt",
            "SYSTEM_PROMPT",
            "the system prompt the page starts with",
            _text,
            shown_default="empty",
            metavar="TEXT",
        ),
    )
    quantize: str | None = setting(
        None,
        Flag(
            "--quantize",
            "QUANTIZE",
            "8bit or 4bit: bitsandbytes (CUDA only, plain generate); int4: the fast decoder over "
            "weight-only int4, quantized while loading or read from a GPTQ or AWQ folder",
            _choice(QUANTIZATIONS),
            choices=QUANTIZATIONS,
            shown_default="none",
        ),
    )
    save_quantized: str | None = setting(
        None,
        Flag(
            "--save-quantized",
            "SAVE_QUANTIZED",
            "with --quantize int4: write the int4 model to this folder, to give as --model next time",
            _text,
            shown_default="none",
            metavar="FOLDER",
        ),
    )
    decoder: str = setting(
        "auto",
        Flag(
            "--decoder",
            "DECODER",
            "the local decode loop: fast (static cache, CUDA graphs on a GPU; runs on the CPU too), "
            "plain (transformers' generate), auto (fast on a CUDA GPU where the model allows, else plain)",
            _choice(DECODERS),
            choices=DECODERS,
        ),
    )
    tensor_parallel: int | str = setting(
        1,
        Flag(
            "--tensor-parallel",
            "TENSOR_PARALLEL",
            "GPUs that share each layer, one process each: N, or auto (every GPU when the model does "
            "not fit on one); fast decoder only, bf16 or --quantize int4",
            _tensor_parallel,
            metavar="N",
        ),
    )
    speculate: str = setting(
        "off",
        Flag(
            "--speculate",
            "SPECULATE",
            "speculative decoding in the fast decoder (the same text, faster where proposals are "
            "accepted): ngram (what followed the same words earlier in the conversation), draft (a "
            "smaller model of the same family and tokenizer, --draft-model) or off",
            _choice(SPECULATIONS),
            choices=SPECULATIONS,
        ),
    )
    draft_model: str | None = setting(
        None,
        Flag(
            "--draft-model",
            "DRAFT_MODEL",
            "with --speculate draft: the draft's hub id or folder (e.g. Falcon-7B for Falcon-180B), "
            "loaded as the model is (int4 with --quantize int4)",
            _text,
            shown_default="none",
            metavar="ID_OR_FOLDER",
        ),
    )
    prompt_format: str = setting(
        "auto",
        Flag(
            "--prompt-format",
            "PROMPT_FORMAT",
            "how a conversation is written for the model: falcon (User:/Falcon: lines), template (the "
            "model's chat template) or auto (locally the template where the model has one, else falcon)",
            _choice(PROMPT_FORMATS),
            choices=PROMPT_FORMATS,
        ),
    )
    max_total_tokens: int | None = setting(
        None,
        Flag(
            "--max-total-tokens",
            "MAX_TOTAL_TOKENS",
            "context length: prompt plus reply",
            _whole_number(16, 10**7),
            shown_default="from the model or server",
            metavar="TOKENS",
        ),
    )
    stop_sequences: tuple[str, ...] = setting(
        DEFAULT_STOP_SEQUENCES,
        Flag(
            "--stop",
            "STOP_SEQUENCES",
            "a stop sequence, replacing the defaults; repeat the flag for several (the variable is "
            "comma-separated); both decode the escapes \\n \\t \\r \\\\ \\, \\uXXXX",
            _stops,
            repeat=True,
            shown_default=", ".join(
                stop.encode("unicode_escape").decode() for stop in DEFAULT_STOP_SEQUENCES
            ),
            metavar="TEXT",
        ),
    )
    max_message_chars: int = setting(
        20_000,
        Flag(
            "--max-message-chars",
            "MAX_MESSAGE_CHARS",
            "longest message (and system prompt) accepted, in characters",
            _whole_number(1, 10**7),
            metavar="CHARS",
        ),
    )
    concurrency_limit: int | None = setting(
        None,
        Flag(
            "--concurrency",
            "CONCURRENCY_LIMIT",
            "generations at once; others wait in the queue and see their place",
            _whole_number(1, 10_000),
            shown_default=f"1 local, {DEFAULT_REMOTE_CONCURRENCY} remote",
            metavar="N",
        ),
    )
    queue_size: int = setting(
        100,
        Flag(
            "--queue-size",
            "QUEUE_SIZE",
            "requests that may wait; when full, new users are told at once that the app is busy",
            _whole_number(1, 100_000),
            metavar="N",
        ),
    )
    page_updates: int = setting(
        DEFAULT_PAGE_UPDATES,
        Flag(
            "--page-updates",
            "PAGE_UPDATES",
            "streamed page updates per second, all replies together: one reply alone updates at "
            "every token (at most every 20 ms), 64 at once each every 0.32 s",
            _whole_number(1, 100_000),
            metavar="N",
        ),
    )
    token: str | None = setting(
        None,
        Flag(
            "--token",
            "HF_TOKEN",
            "hub or server token (never shown or logged)",
            _text,
            shown_default="none",
            metavar="TOKEN",
        ),
        repr=False,
    )
    api_key: str | None = setting(
        None,
        Flag(
            "--api-key",
            "OPENAI_API_KEY",
            "API key for openai servers (never shown or logged; no header when unset)",
            _text,
            shown_default="none",
            metavar="KEY",
        ),
        repr=False,
    )
    connect_timeout_s: float = setting(
        10.0,
        Flag(
            "--connect-timeout", "CONNECT_TIMEOUT", "remote: seconds to connect", _seconds, metavar="SECONDS"
        ),
    )
    first_token_timeout_s: float = setting(
        120.0,
        Flag(
            "--first-token-timeout",
            "FIRST_TOKEN_TIMEOUT",
            "remote: seconds to wait for the first token",
            _seconds,
            metavar="SECONDS",
        ),
    )
    token_timeout_s: float = setting(
        30.0,
        Flag(
            "--token-timeout",
            "TOKEN_TIMEOUT",
            "remote: longest silence between two tokens, in seconds",
            _seconds,
            metavar="SECONDS",
        ),
    )
    busy_retries: int = setting(
        3,
        Flag(
            "--busy-retries",
            "BUSY_RETRIES",
            "remote: retries, with backoff 0.5 s, 1 s, 2 s..., while every server is busy",
            _whole_number(0, 20),
            metavar="N",
        ),
    )
    endpoint_cooldown_s: float = setting(
        30.0,
        Flag(
            "--endpoint-cooldown",
            "ENDPOINT_COOLDOWN",
            "remote: seconds an endpoint that failed is tried last",
            _seconds,
            metavar="SECONDS",
        ),
    )
    log_messages: bool = setting(
        False,
        Flag("--log-messages", "LOG_MESSAGES", "put message text in the request log", _switch, switch=True),
    )
    allow_embed_from: tuple[str, ...] = setting(
        (),
        Flag(
            "--allow-embed-from",
            "ALLOW_EMBED_FROM",
            "origins that may frame the page (https://example.com, https://*.example.com, https:), "
            "comma-separated or repeated",
            _origins,
            repeat=True,
            shown_default="any site",
            metavar="ORIGINS",
        ),
    )
    max_request_bytes: int = setting(
        DEFAULT_MAX_REQUEST_BYTES,
        Flag(
            "--max-request-bytes",
            "MAX_REQUEST_BYTES",
            "largest HTTP request body accepted; larger ones get 413 before Gradio reads them",
            _whole_number(1024, 2**31),
            metavar="BYTES",
        ),
    )
    request_timeout_s: float = setting(
        DEFAULT_REQUEST_TIMEOUT_S,
        Flag(
            "--request-timeout",
            "REQUEST_TIMEOUT",
            "seconds a client has to send a request's headers and body; slower ones are disconnected",
            _seconds,
            metavar="SECONDS",
        ),
    )
    connections_per_client: int = setting(
        DEFAULT_CONNECTIONS_PER_CLIENT,
        Flag(
            "--connections-per-client",
            "CONNECTIONS_PER_CLIENT",
            "connections one address may hold open; 0: any",
            _whole_number(0, 100_000),
            metavar="N",
        ),
    )
    requests_per_second: int = setting(
        DEFAULT_REQUESTS_PER_SECOND,
        Flag(
            "--requests-per-second",
            "REQUESTS_PER_SECOND",
            "requests per second one address may make (one that queues a reply counts as 10), with bursts "
            "of 10 seconds' worth; 0: any",
            _whole_number(0, 100_000),
            metavar="N",
        ),
    )

    @property
    def default_params(self) -> GenerationParams:
        return GenerationParams(stop_sequences=self.stop_sequences)


def _flag_fields() -> list[tuple[dataclasses.Field, Flag]]:
    return [(f, f.metadata["flag"]) for f in dataclasses.fields(Settings) if "flag" in f.metadata]


FLAGS: tuple[Flag, ...] = tuple(flag for _, flag in _flag_fields())


def shown_default(field: dataclasses.Field, flag: Flag) -> str:
    """The default as --help and the README name it."""
    if flag.shown_default is not None:
        return flag.shown_default
    if flag.switch:
        return "off"
    return str(field.default)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit 2
        raise ConfigError(message)


def parser() -> argparse.ArgumentParser:
    """The command line, built from the flags: each shows its choices, default and variable."""
    p = _Parser(
        prog="app.py",
        description="Falcon Chat: a chat web app for Falcon models. Every flag has an environment "
        "variable; a flag wins over its variable.",
    )
    for field, flag in _flag_fields():
        help_text = f"{flag.help} (default: {shown_default(field, flag)}; env {flag.env})"
        options: dict = dict(dest=field.name, help=help_text.replace("%", "%%"))
        if flag.switch:
            options.update(action="store_true", default=None)
        else:
            options.update(action="append" if flag.repeat else "store")
            options["metavar"] = "{" + ",".join(flag.choices) + "}" if flag.choices else flag.metavar
        p.add_argument(flag.name, **options)
    return p


def load_settings(argv: Sequence[str] | None = None, environ=None) -> Settings:
    """Settings from flags, then environment variables, then defaults; checked."""
    environ = os.environ if environ is None else environ
    given = vars(parser().parse_args(argv))
    values = {}
    for field, flag in _flag_fields():
        raw = given.get(field.name)
        if raw in (None, []):
            raw = environ.get(flag.env) or None
        if raw is not None:
            values[field.name] = flag.read(flag.name, raw)
    settings = Settings(**values)
    _check(settings)
    return settings


def _check(settings: Settings) -> None:
    """What each value alone cannot tell: settings that do not go together."""
    if settings.save_quantized and settings.quantize != "int4":
        raise ConfigError("--save-quantized needs --quantize int4")
    if (settings.speculate == "draft") != bool(settings.draft_model):
        raise ConfigError("--speculate draft and --draft-model go together")
    if settings.speculate != "off" and (settings.backend != "local" or settings.decoder == "plain"):
        raise ConfigError("--speculate runs in the local fast decoder: not with a server or --decoder plain")
    if settings.backend == "local" and settings.endpoints:
        raise ConfigError(
            "--endpoint is for a model server: add --backend tgi or --backend openai (or sagemaker) to "
            "use it; without --backend the model runs in this process"
        )
    if settings.backend != "local" and not settings.endpoints:
        raise ConfigError(f"--backend {settings.backend} needs --endpoint (env ENDPOINT)")
    if settings.backend in HTTP_BACKENDS:
        for endpoint in settings.endpoints:
            _check_url(endpoint)
    if len(settings.stop_sequences) > MAX_STOP_SEQUENCES:
        raise ConfigError(f"at most {MAX_STOP_SEQUENCES} stop sequences (--stop) are allowed")
    try:
        _ = settings.default_params  # builds and checks the stop sequences
    except Exception as error:
        raise ConfigError(f"--stop: {getattr(error, 'user_message', error)}") from None


def _check_url(endpoint: str) -> None:
    """A server's address must say how to reach it: without http://, every request would fail."""
    parts = urlsplit(endpoint)
    if "://" not in endpoint:
        raise ConfigError(f"--endpoint {endpoint!r} needs a scheme: --endpoint http://{endpoint}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--endpoint {endpoint!r} is not an http:// or https:// address of a server")


def flag_table() -> str:
    """The README's configuration table, made from the flags (tests/test_config.py keeps them equal)."""
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for field, flag in _flag_fields():
        default = shown_default(field, flag)
        literal = flag.shown_default is None and not flag.switch  # a value to type: as code
        default = f"`{default}`" if literal else _markdown(default)
        cells = [f"`{flag.name}`", f"`{flag.env}`", default, _markdown(flag.help)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


# A word with a backslash or an angle bracket (an escape, a special token) is shown as code, so
# Markdown neither eats its backslash nor reads it as a tag; a comma after it stays outside.
_LITERAL_WORD = re.compile(r"\S*[\\<]\S*")


def _markdown(text: str) -> str:
    def as_code(match: re.Match) -> str:
        word, tail = match.group(0), ""
        if word.endswith(",") and not word.endswith("\\,"):
            word, tail = word[:-1], ","
        return f"`{word}`{tail}"

    return _LITERAL_WORD.sub(as_code, text).replace("|", "\\|")


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
    origins = []
    for origin in _items(raw):
        if origin.endswith("/") and "://" in origin and origin.count("/") == 3:
            origin = origin[:-1]  # "https://example.com/" as copied from the address bar
        if not _ORIGIN.fullmatch(origin):
            raise ConfigError(
                f"--allow-embed-from: {origin!r} is not an origin like https://example.com, "
                "https://*.example.com or https:"
            )
        origins.append(origin)
    return tuple(dict.fromkeys(origins))


if __name__ == "__main__":  # python -m chat.config: the README's table
    print(flag_table())
