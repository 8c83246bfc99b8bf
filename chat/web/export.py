"""A conversation as files to keep: Markdown to read, JSON to process."""

from __future__ import annotations

import json

from chat.conversation.inline_math import written
from chat.conversation.turns import note_of, shown_messages, strip_note


def conversation_messages(history) -> list[dict]:
    """Gradio history as plain `{"role", "content"}` messages: the words, the app's note on how a
    reply ended (stopped, cut short) apart in `note`; the figures' messages are left out."""
    messages = []
    for message in shown_messages(history):
        text, note = message.text, ""
        if message.role == "assistant":
            text, note = written(strip_note(text)).strip(), note_of(text)
        if message.role in ("user", "assistant") and not message.title and (text or note):
            messages.append({"role": message.role, "content": text, **({"note": note} if note else {})})
    return messages


def conversation_markdown(history, *, system_prompt: str = "", model_name: str = "") -> str:
    lines = ["# Falcon Chat conversation", ""]
    # The model's replies under its own name: "Falcon" only for a Falcon.
    assistant = model_name.rsplit("/", 1)[-1] if model_name else "Assistant"
    if model_name:
        lines += [f"Model: {model_name}", ""]
    if system_prompt:
        lines += [f"**System:** {system_prompt}", ""]
    for message in conversation_messages(history):
        speaker = "User" if message["role"] == "user" else assistant
        lines += [f"**{speaker}:** {message['content']}", ""]
        if message.get("note"):
            lines += [f"> {message['note']}", ""]
    return "\n".join(lines)


def conversation_json(history, *, system_prompt: str = "", model_name: str = "") -> str:
    document = {
        "model": model_name,
        "system_prompt": system_prompt,
        "messages": conversation_messages(history),
    }
    return json.dumps(document, ensure_ascii=False, indent=2)
