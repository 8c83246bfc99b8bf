"""Gradio's chat history in, our own turns out: the one place that knows Gradio's shapes.

Accepted: Gradio 6 messages (`{"role", "content"}`, content a string or a list of
`{"type": "text", "text": ...}` parts, or message objects with those attributes) and legacy
`(user, bot)` pairs. Other roles, non-text parts, the figures' messages and our own notes (errors
and the like, which the app appends to a reply and must not feed back to the model) are left out,
and a reply's inline math comes back as the model wrote it (chat/conversation/inline_math.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from chat.conversation.inline_math import written

# A note the app appends to a reply (an error, a cut reply): a markdown quote starting with this.
NOTE_MARK = "> ⚠️ "
_NOTE_AT_END = re.compile(r"(?:\A|\n\n)" + re.escape(NOTE_MARK) + r"[^\n]*\Z")
# The figures of a reply (tokens, timings, how it ended) are a message of their own after it,
# with the figures as its title: a display, never the model's words.
# Replies saved by earlier versions carry their figures inside the text, as this one-line footer.
_OLD_FOOTER_AT_END = re.compile(r"(?:\A|\n\n)<sub>📊 [^\n]*</sub>\Z")


@dataclass(frozen=True)
class Turn:
    """One finished exchange: what the user said and what the model answered."""

    user: str
    assistant: str


def add_note(reply: str, note: str) -> str:
    """Append a note to a (possibly empty) reply, in the form `strip_note` removes."""
    note = NOTE_MARK + " ".join(note.split())
    return f"{reply}\n\n{note}" if reply else note


def figures_message(figures: str) -> dict:
    """The message shown after a reply with its figures: metadata only, outside the reply's text
    (copying the reply, or `/chat`, gives the words alone); `turns_from_history` skips it."""
    return {
        "role": "assistant",
        "content": "",
        "metadata": {"title": " ".join(figures.split()), "status": "done"},
    }


def strip_note(reply: str) -> str:
    """The model's own words: the reply without the app's note (or an old saved footer), if any."""
    return _NOTE_AT_END.sub("", _OLD_FOOTER_AT_END.sub("", reply))


def note_of(reply: str) -> str:
    """The app's note at the end of a reply (how it ended, when not normally), or ""."""
    match = _NOTE_AT_END.search(_OLD_FOOTER_AT_END.sub("", reply))
    return match.group(0).strip()[len(NOTE_MARK) :] if match else ""


def content_text(content) -> str:
    """The text of a message's content: a string, a list of parts, or anything else (no text)."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text":
                texts.append(str(part.get("text") or ""))
        return "\n".join(texts)
    return ""


def turns_from_history(history) -> list[Turn]:
    """Gradio history (messages or pairs) to finished turns, oldest first."""
    turns: list[Turn] = []
    pending_user: str | None = None
    replies: list[str] = []

    def finish() -> None:
        reply = written(strip_note("\n".join(replies))).strip()
        # A user message whose reply failed or is missing is not a turn the model should see.
        if pending_user is not None and reply:
            turns.append(Turn(pending_user, reply))

    for item in history or []:
        if isinstance(item, (list, tuple)) and len(item) == 2:
            finish()
            pending_user, replies = content_text(item[0]), [content_text(item[1])]
            continue
        role, content, metadata = _message_fields(item)
        if role == "user":
            finish()
            pending_user, replies = content_text(content), []
        elif role == "assistant" and pending_user is not None and not metadata:
            # Messages with metadata (titles, tool logs) are displays, not the model's words.
            replies.append(content_text(content))
    finish()
    return turns


def _message_fields(item):
    if isinstance(item, dict):
        return item.get("role"), item.get("content"), _title(item.get("metadata"))
    return (
        getattr(item, "role", None),
        getattr(item, "content", None),
        _title(getattr(item, "metadata", None)),
    )


def _title(metadata) -> str:
    if isinstance(metadata, dict):
        return str(metadata.get("title") or "")
    return str(getattr(metadata, "title", "") or "")
