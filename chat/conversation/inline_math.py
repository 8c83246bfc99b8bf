"""Inline `$…$` math: the reply as the page shows it, and the model's own text back from that.

Gradio's KaTeX finds math by its delimiters alone, so `$` as a delimiter would turn "$5 and $10"
into a formula. Instead, the `$…$` that read as math (Pandoc's rule: no space inside the dollars,
no digit after the closing one) are marked with an invisible word joiner inside each `$`, and the
page renders only marked pairs (`LATEX_DELIMITERS`). The page sends the shown text back as the
history, so `written` takes the marks out again before a reply reaches the prompt or an export,
and the page's script (assets/page.js) takes them out of whatever is copied.
"""

from __future__ import annotations

import re

MARK = "\u2060"  # WORD JOINER: invisible, and it keeps the math on the line of its `$`
OPEN, CLOSE = "$" + MARK, MARK + "$"
# Math the page renders: `$$…$$` and `\[…\]` as blocks, marked `$…$` and `\(…\)` inline.
LATEX_DELIMITERS = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "\\[", "right": "\\]", "display": True},
    {"left": OPEN, "right": CLOSE, "display": False},
    {"left": "\\(", "right": "\\)", "display": False},
]

# Code spans and blocks are left alone; even pieces of a split are outside code.
_CODE = re.compile(r"(```.*?(?:```|\Z)|`[^`\n]*`)", re.DOTALL)
# `$` then a non-space, closed by a `$` after a non-space and not followed by a digit.
_INLINE_DOLLARS = re.compile(r"(?<![\\$\w])\$(?=[^\s$])([^$\n]*?[^\s$\\])\$(?![\d$])")
_MARKS = re.compile(re.escape(OPEN) + "|" + re.escape(CLOSE))


def shown(text: str) -> str:
    """`text` with each inline `$…$` marked for the page to render as math (a lone `$` never is)."""
    if "$" not in text:
        return text
    pieces = _CODE.split(text)
    for index in range(0, len(pieces), 2):
        pieces[index] = _INLINE_DOLLARS.sub(lambda math: OPEN + math.group(1) + CLOSE, pieces[index])
    return "".join(pieces)


def written(text: str) -> str:
    """A shown reply as the model wrote it: the marks `shown` added taken out."""
    return _MARKS.sub("$", text) if MARK in text else text
