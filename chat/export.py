"""A conversation as files to keep: Markdown to read, JSON to process."""

from __future__ import annotations

import json

from .history import content_text, strip_note


def conversation_messages(history) -> list[dict]:
    """Gradio history as plain `{"role", "content"}` messages: the words, without the app's notes."""
    messages = []
    for item in history or []:
        if isinstance(item, (list, tuple)) and len(item) == 2:
            pairs = [("user", item[0]), ("assistant", item[1])]
        elif isinstance(item, dict):
            pairs = [(item.get("role"), item.get("content"))]
        else:
            pairs = [(getattr(item, "role", None), getattr(item, "content", None))]
        for role, content in pairs:
            text = content_text(content)
            if role == "assistant":
                text = strip_note(text).strip()
            if role in ("user", "assistant") and text:
                messages.append({"role": role, "content": text})
    return messages


def conversation_markdown(history, *, system_prompt: str = "", model_name: str = "") -> str:
    lines = ["# Falcon Chat conversation", ""]
    if model_name:
        lines += [f"Model: {model_name}", ""]
    if system_prompt:
        lines += [f"**System:** {system_prompt}", ""]
    for message in conversation_messages(history):
        speaker = "User" if message["role"] == "user" else "Falcon"
        lines += [f"**{speaker}:** {message['content']}", ""]
    return "\n".join(lines)


def conversation_json(history, *, system_prompt: str = "", model_name: str = "") -> str:
    document = {
        "model": model_name,
        "system_prompt": system_prompt,
        "messages": conversation_messages(history),
    }
    return json.dumps(document, ensure_ascii=False, indent=2)
