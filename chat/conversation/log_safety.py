"""Everything this app logs, made safe for one log line: one path for our records and every library's.

A server's error text can repeat anything it was sent: the user's message (with newlines that
would start a forged log record), the Authorization header, a token in a URL; the HTTP clients log
endpoint addresses with their credentials. `log_text` scrubs secrets, withholds text that repeats
the conversation, escapes every character that could end or disguise a line (control characters,
U+0085, U+2028, U+2029, bidirectional overrides) and trims what is left. `json_line` writes a JSON
record that stays one line in every reader.

`install` puts `log_text` in front of every log record of the process, whichever library makes
it (httpx2, the openai SDK, uvicorn, asyncio, Gradio): a record factory, so no handler or logger
configuration can route around it. The record's arguments are scrubbed, withheld when they
repeat the conversation of the reply being produced (`private_texts`, set by the reply loop)
unless `--log-messages` is on, and escaped; an exception's traceback is folded into the same
line. `RepeatLimit` is the handler filter that keeps one kind of record from flooding the log.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping

MAX_LOG_TEXT = 500  # characters of one argument (a server's text, an address) kept in a record
MAX_RECORD_TEXT = 100_000  # characters of one whole record (a --log-messages request line)
REDACTED = "***"

_SECRETS = [
    # Credentials in a URL: scheme://user:password@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@"), r"\1" + REDACTED + "@"),
    # Hugging Face, OpenAI-style and AWS access keys, wherever they appear.
    (re.compile(r"\bhf_[A-Za-z0-9]{8,}"), "hf_" + REDACTED),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"), "sk-" + REDACTED),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "AKIA" + REDACTED),
    # An Authorization header's value: "Bearer <token>", "Basic <credentials>".
    (re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=:-]{6,}"), r"\1\2" + REDACTED),
    # key=value and "key": "value" for names that hold secrets (query strings, JSON, headers).
    # Not a word that merely ends in "token" ("max_new_tokens=", "first token within").
    (
        re.compile(
            r"(?i)(\b(?:authorization|api[_-]?key|access[_-]?token|auth[_-]?token|secret[_a-z-]*|"
            r"password|passwd|x-amz-security-token|x-amz-signature|x-amz-credential|"
            r"aws_secret_access_key|aws_session_token|signature|token)"
            r"[\"']?\s*[:=]\s*[\"']?)(?!\*\*\*)[^\s\"',;&}]+"
        ),
        r"\1" + REDACTED,
    ),
]
# Characters that end a line in some reader, or reorder what a reader shows.
# Lone surrogates too: a log handler writing UTF-8 would fail on them.
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff\ud800-\udfff]"
)
_WINDOW = 16  # a text sharing this many characters in a row with the conversation repeats it
_STEP = _WINDOW // 2  # windows of the conversation taken every 8 characters: any echo of 23+ is seen


def scrub_secrets(text: str) -> str:
    """`text` with tokens, keys, Authorization values and URL credentials replaced by ***."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def escape_line_breaks(text: str) -> str:
    """Control characters, line and paragraph separators and bidi controls as visible escapes."""
    return _UNSAFE.sub(lambda m: _escape(m.group()), text)


def _escape(character: str) -> str:
    special = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    if character in special:
        return special[character]
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class PrivateTexts:
    """The texts of a conversation, indexed (on first use) so that a text is checked for repeating
    them in time proportional to its own length: a reply's log records against its whole history."""

    def __init__(self, texts: Iterable[str] = ()):
        # A word or two is too common to tell an echo from a coincidence.
        self._texts = tuple(t for t in texts if isinstance(t, str) and len(t.strip()) >= 8)
        self._windows: set[str] | None = None

    def __bool__(self) -> bool:
        return bool(self._texts)

    def repeated_in(self, text: str) -> bool:
        """Whether `text` contains 16 characters in a row of one of the texts (or a shorter one whole)."""
        if self._windows is None:
            self._windows = {
                t[i : i + _WINDOW] for t in self._texts for i in range(0, len(t) - _WINDOW + 1, _STEP)
            }
        if any(short in text for short in self._texts if len(short) < _WINDOW):
            return True
        windows = self._windows
        return bool(windows) and any(text[i : i + _WINDOW] in windows for i in range(len(text) - _WINDOW + 1))


def repeats(text: str, private: Iterable[str] | PrivateTexts) -> bool:
    """Whether `text` contains any run of 16 characters of one of the `private` texts."""
    private = private if isinstance(private, PrivateTexts) else PrivateTexts(private)
    return private.repeated_in(text)


def log_text(text, *, limit: int = MAX_LOG_TEXT, private: Iterable[str] | PrivateTexts = ()) -> str:
    """`text` fit for one log line: secrets scrubbed, withheld if it repeats any of the `private`
    texts (the conversation), line breaks escaped, at most `limit` characters (then marked)."""
    text = "" if text is None else str(text)
    # Only what is kept needs checking (escapes only lengthen it): a long text costs no more.
    if private and repeats(text[: limit + _WINDOW], private):
        return f"[{len(text):,} characters withheld: they repeat the conversation; --log-messages shows them]"
    text = escape_line_breaks(scrub_secrets(text))
    if len(text) > limit:
        text = f"{text[:limit]}…[+{len(text) - limit:,} characters]"
    return text


def json_line(record: dict) -> str:
    """`record` as JSON on one line in every reader (U+0085, U+2028 and U+2029 escaped too)."""
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(record, ensure_ascii=False))


# -- every record of the process -----------------------------------------------------------------

_conversation: contextvars.ContextVar[PrivateTexts | None] = contextvars.ContextVar(
    "falcon_chat_conversation", default=None
)
_policy = {"log_messages": False}
# The request log (chat.web.operations) writes one JSON record per reply, each field made safe on
# its own (the server's error text withheld when it repeats the message, the message itself only
# with --log-messages): as a whole it is scrubbed and escaped, not compared with the conversation.
REQUEST_LOG = "falcon_chat.requests"
_installed_lock = threading.Lock()


@contextlib.contextmanager
def private_texts(texts: Iterable[str]) -> Iterator[None]:
    """While inside, log records made in this context (the reply's thread) withhold any argument
    that repeats one of `texts`, unless `--log-messages` is on."""
    token = _conversation.set(PrivateTexts(texts))
    try:
        yield
    finally:
        try:
            _conversation.reset(token)
        except ValueError:  # a generator holding this closed from another context: nothing to undo
            pass


def safe_record(record: logging.LogRecord, *, withhold: bool = True) -> logging.LogRecord:
    """`record` made safe in place: its message formatted from scrubbed, escaped arguments (those
    that repeat the conversation withheld), its traceback folded into the same line."""
    private = _conversation.get() if withhold and not _policy["log_messages"] else None
    private = private if private else ()
    template = record.msg if isinstance(record.msg, str) else str(record.msg)
    args = record.args
    if args:
        if isinstance(args, Mapping):
            safe_args = {key: _safe_argument(value, private) for key, value in args.items()}
        else:
            safe_args = tuple(_safe_argument(value, private) for value in args)
        try:
            message = template % safe_args
        except (TypeError, ValueError, KeyError):
            message = f"{template} {safe_args!r}"
    else:
        message = template
    if record.exc_info and record.exc_info[0] is not None:
        message += " | " + "".join(traceback.format_exception(*record.exc_info)).rstrip()
    elif record.exc_text:
        message += " | " + record.exc_text
    if record.stack_info:
        message += " | " + record.stack_info
    record.template = template  # what RepeatLimit groups records by
    record.msg = log_text(
        message, limit=MAX_RECORD_TEXT, private=() if record.name == REQUEST_LOG else private
    )
    record.args = None
    record.exc_info = record.exc_text = record.stack_info = None
    return record


def _safe_argument(value, private):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value  # numbers keep their %d / %.2f formatting
    return log_text(value, private=private)


def install(*, log_messages: bool = False) -> None:
    """Make every log record of this process safe as it is created (see the module docstring).
    `log_messages`: whether records may repeat the conversation (`--log-messages`); one setting
    for the process, the last app built decides. Idempotent."""
    with _installed_lock:
        _policy["log_messages"] = log_messages
        factory = logging.getLogRecordFactory()
        if getattr(factory, "falcon_chat_safe", False):
            return

        def safe_factory(*args, **kwargs) -> logging.LogRecord:
            return safe_record(factory(*args, **kwargs))

        safe_factory.falcon_chat_safe = True
        logging.setLogRecordFactory(safe_factory)


class RepeatLimit(logging.Filter):
    """A handler filter: at most `burst` records of one kind (logger, level, message template) per
    `window_s`; the rest are dropped and counted, and the next record of that kind to pass says how
    many. A failure that repeats many times a second (accepting connections at the file-descriptor
    limit) then costs a few lines a minute, not hundreds of megabytes."""

    def __init__(self, burst: int = 20, window_s: float = 60.0, clock=time.monotonic):
        super().__init__()
        self.burst, self.window_s, self.clock = burst, window_s, clock
        self._kinds: dict[tuple, list] = {}  # kind -> [window start, passed, dropped]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, record.levelno, getattr(record, "template", record.msg))
        now = self.clock()
        with self._lock:
            state = self._kinds.get(kind)
            if state is None or now - state[0] >= self.window_s:
                dropped = state[2] if state else 0
                if len(self._kinds) > 10_000:  # kinds are code locations; bounded all the same
                    self._kinds.clear()
                self._kinds[kind] = [now, 1, 0]
                if dropped:
                    record.msg = f"{record.msg} [{dropped:,} more like this were not logged]"
                return True
            if state[1] < self.burst:
                state[1] += 1
                return True
            state[2] += 1
            return False


def configure_logging(level: int = logging.INFO, *, log_messages: bool = False) -> None:
    """The app's logging: one line per record on stderr, every record safe (`install`), each kind
    of record limited (`RepeatLimit`)."""
    install(log_messages=log_messages)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RepeatLimit) for f in handler.filters):
            handler.addFilter(RepeatLimit())
