"""The streaming stop filter shared by every backend: token texts in, text to show out.

Guarantees, for any split of the stream into pieces:
- every text it returns is a prefix of the final text (the page never has to take text back);
- text that could still become a stop sequence is held back until that is decided, and the reply
  ends at the first full stop sequence, which is never shown;
- trailing whitespace is not shown (the model writes newlines before the next turn), nor is
  leading whitespace in a chat reply (the model writes a space after `Falcon:`); a raw
  continuation keeps its leading space, which separates it from the text it continues;
- U+FFFD, what a decoder writes for half a UTF-8 character, is never shown.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_REPLACEMENT = "\ufffd"


class StopFilter:
    """Feed it token texts with `push`; read `text` (what may be shown) and `stopped`."""

    def __init__(self, stop_sequences: Iterable[str], *, keep_leading_space: bool = False):
        self._keep_leading_space = keep_leading_space
        self.stop_sequences = tuple(s for s in stop_sequences if s)
        self._longest = max((len(s) for s in self.stop_sequences), default=0)
        self._buffer = ""
        self.text = ""  # the text that may be shown now
        self.stopped = False  # a stop sequence was seen: the reply is complete

    def push(self, piece: str) -> bool:
        """Add a piece of generated text; True if `text` grew."""
        if self.stopped or not piece:
            return False
        start = max(0, len(self._buffer) - self._longest + 1)
        self._buffer += piece.replace(_REPLACEMENT, "")
        end = self._first_stop(start)
        if end is not None:
            self._buffer = self._buffer[:end]
            self.stopped = True
            return self._show(len(self._buffer))
        return self._show(len(self._buffer) - self._held_back())

    def finish(self) -> str:
        """The stream ended: nothing is held back any more. Returns the final text."""
        self._show(len(self._buffer))
        return self.text

    def _first_stop(self, start: int) -> int | None:
        found = [i for s in self.stop_sequences if (i := self._buffer.find(s, start)) >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """Length of the longest end of the buffer that is the start of a stop sequence."""
        for size in range(min(self._longest - 1, len(self._buffer)), 0, -1):
            tail = self._buffer[-size:]
            if any(stop.startswith(tail) for stop in self.stop_sequences):
                return size
        return 0

    def _show(self, end: int) -> bool:
        text = self._buffer[:end].rstrip()
        if not self._keep_leading_space:
            text = text.lstrip()
        if len(text) > len(self.text):
            self.text = text
            return True
        return False


# Backslash escapes a stop sequence may contain, in flags and the environment alike; every other
# character (accents, CJK, a lone backslash) stays as typed.
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", ",": ","}
_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|[ntr\\,])")


def decode_escapes(text: str) -> str:
    """`\\n`, `\\t`, `\\r`, `\\\\`, `\\,` and `\\uXXXX` decoded; nothing else touched."""
    return _ESCAPE.sub(lambda m: chr(int(m[1][1:], 16)) if m[1][0] == "u" else _ESCAPES[m[1]], text)


def split_unescaped_commas(text: str) -> list[str]:
    """Split at commas that no backslash escapes; the escapes stay for `decode_escapes`."""
    return [part for part in re.split(r"(?<!\\),", text) if part]
