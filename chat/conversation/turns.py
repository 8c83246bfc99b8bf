"""Gradio's chat history in, our own turns out: the one place that knows Gradio's shapes.

`shown_messages` is the one parser of them (the reply loop, export and the page's handlers all
read history through it); `page_message` writes the shape the page's Chatbot keeps. Accepted:
Gradio 6 messages (`{"role", "content"}`, content a string or a list of
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
# with the figures as its title (`page_message(title=...)`): a display, never the model's words.
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


@dataclass(frozen=True)
class ShownMessage:
    """One message of a conversation as the page shows it: who, the text, and the title of a
    message that is a display the app added (a reply's figures), never anyone's words."""

    role: str | None
    text: str
    title: str = ""


def shown_messages(history) -> list[ShownMessage]:
    """Every message of Gradio's history, whatever its shape (see the module's docstring):
    a legacy pair gives two."""
    messages = []
    for item in history or []:
        if isinstance(item, (list, tuple)) and len(item) == 2:
            messages += [
                ShownMessage("user", content_text(item[0])),
                ShownMessage("assistant", content_text(item[1])),
            ]
            continue
        fields = item if isinstance(item, dict) else None

        def field(name, item=item, fields=fields):
            return fields.get(name) if fields is not None else getattr(item, name, None)

        role = field("role")
        messages.append(
            ShownMessage(
                role if isinstance(role, str) else None,
                content_text(field("content")),
                _title(field("metadata")),
            )
        )
    return messages


def page_message(role: str, text: str, *, title: str = "", options: tuple[str, ...] = ()) -> dict:
    """A message in the shape Gradio's Chatbot keeps on the page (what the page's script stores
    and shows): text parts, the figures' title, the buttons offered under it (`options`)."""
    return {
        "role": role,
        "content": [{"type": "text", "text": text}],
        "metadata": {"title": title, "status": "done"} if title else None,
        "options": [{"label": option, "value": option.lower()} for option in options] or None,
    }


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

    for message in shown_messages(history):
        if message.role == "user":
            finish()
            pending_user, replies = message.text, []
        elif message.role == "assistant" and pending_user is not None and not message.title:
            # Messages with titles (the figures, tool logs) are displays, not the model's words.
            replies.append(message.text)
    finish()
    return turns


def _title(metadata) -> str:
    if isinstance(metadata, dict):
        return str(metadata.get("title") or "")
    return str(getattr(metadata, "title", "") or "")
