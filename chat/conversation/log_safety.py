"""Text from outside (a server's error, an endpoint address, a user's words) made safe for one log line.

A server's error text can repeat anything it was sent: the user's message (with newlines that
would start a forged log record), the Authorization header, a token in a URL. `log_text` scrubs
secrets, withholds text that repeats the conversation, escapes every character that could end or
disguise a line (control characters, U+0085, U+2028, U+2029, bidirectional overrides) and trims
what is left. `json_line` writes a JSON record that stays one line in every reader.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

MAX_LOG_TEXT = 500  # characters of server text kept in one log line
REDACTED = "***"

_SECRETS = [
    # Credentials in a URL: scheme://user:password@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@"), r"\1" + REDACTED + "@"),
    # Hugging Face, OpenAI-style and AWS access keys, wherever they appear.
    (re.compile(r"\bhf_[A-Za-z0-9]{8,}"), "hf_" + REDACTED),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"), "sk-" + REDACTED),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "AKIA" + REDACTED),
    # An Authorization header's value: "Bearer <token>", "Basic <credentials>".
    (re.compile(r"(?i)\b(bearer|basic|token)(\s+)[A-Za-z0-9._~+/=:-]{6,}"), r"\1\2" + REDACTED),
    # key=value and "key": "value" for names that hold secrets (query strings, JSON, headers).
    (
        re.compile(
            r"(?i)((?:authorization|api[_-]?key|access[_-]?token|auth[_-]?token|secret[_a-z-]*|"
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
_WINDOW = 16  # a server text sharing this many characters in a row with the conversation repeats it


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


def repeats(text: str, private: Iterable[str]) -> bool:
    """Whether `text` contains any run of 16 characters of one of the `private` texts."""
    for secret in private:
        if not isinstance(secret, str) or len(secret.strip()) < 8:
            continue  # a word or two: too common to tell an echo from a coincidence
        if len(secret) < _WINDOW:
            if secret in text:
                return True
            continue
        step = _WINDOW // 2
        for start in range(0, max(1, len(secret) - _WINDOW + 1), step):
            if secret[start : start + _WINDOW] in text:
                return True
    return False


def log_text(text, *, limit: int = MAX_LOG_TEXT, private: Iterable[str] = ()) -> str:
    """`text` fit for one log line: secrets scrubbed, withheld if it repeats any of the `private`
    texts (the conversation), line breaks escaped, at most `limit` characters (then marked)."""
    text = "" if text is None else str(text)
    if private and repeats(text, private):
        return f"[{len(text):,} characters withheld: they repeat the conversation; --log-messages shows them]"
    text = escape_line_breaks(scrub_secrets(text))
    if len(text) > limit:
        text = f"{text[:limit]}…[+{len(text) - limit:,} characters]"
    return text


def json_line(record: dict) -> str:
    """`record` as JSON on one line in every reader (U+0085, U+2028 and U+2029 escaped too)."""
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(record, ensure_ascii=False))
