"""Prompt formats: how a conversation is written for the model.

- `FalconFormat`: what Falcon chat models were tuned on,
  `System: ...\\nUser: ...\\nFalcon: ...\\nUser: <message>\\nFalcon:`.
- `ChatTemplateFormat`: the tokenizer's own chat template (Falcon3, Falcon-H1, SmolLM2 and most
  current models ship one), rendered here to text for the local model.
- `ServerTemplateFormat`: role/content messages (`ChatMessages`) for a server's chat route
  (`/v1/chat/completions`), where the server applies the model's template.

Every format neutralises what could forge a turn inside a text: the model only knows where a turn
starts from a role marker at the start of a line (Falcon) or from a special token (`<|im_start|>`),
so a zero-width space goes in front of a typed marker, or inside a typed special token, which the
tokenizer then reads as plain text. The visible text does not change.

What counts, and why:
- Role markers at the start of a line, in any case and after any indentation (`user:`,
  `  FALCON :`): a model tuned on `User:`/`Falcon:` lines may well take those for turns too. In
  the middle of a line (`Dear User:`) a marker is ordinary text, and stays as typed.
- Falcon's own special tokens. The Falcon-7B/40B/180B tokenizer has twelve, ids 0-11, marked
  special in its tokenizer.json: `>>TITLE<<`, `>>ABSTRACT<<`, `>>INTRODUCTION<<`, `>>SUMMARY<<`,
  `>>COMMENT<<`, `>>ANSWER<<`, `>>QUESTION<<`, `>>DOMAIN<<`, `>>PREFIX<<`, `>>SUFFIX<<`,
  `>>MIDDLE<<`, `<|endoftext|>` (as cmp-nct/ggllm.cpp's falcon_main.cpp lists them). A tokenizer
  reads such text as the special token itself, whatever surrounds it, and `>>QUESTION<<` /
  `>>ANSWER<<` are the very tokens people prompt Falcon's instruct models with to mark a question
  and its answer: typed into a message they matter, so they are broken like the others.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from chat.conversation.turns import Turn

log = logging.getLogger(__name__)

PROMPT_FORMATS = ("falcon", "template", "auto")  # auto: the model's template where it has one

ROLE_MARKERS = ("User:", "Falcon:", "System:")
# Python's str.splitlines() boundaries, so "a line" means the same thing to every reader.
_LINE_START = r"(?:\A|(?<=[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]))"
_FORGED_MARKER = re.compile(_LINE_START + r"([ \t]*)(?=(?:user|falcon|system)[ \t]*:)", re.IGNORECASE)
_ZERO_WIDTH_SPACE = "\u200b"
# Special-token shapes of common templates, for servers whose tokenizer we cannot see:
# ChatML and Falcon3 `<|...|>`, Falcon's `>>QUESTION<<` family (see the module docstring),
# Llama 2 `[INST]` and `<<SYS>>`, Gemma `<start_of_turn>`, `<s>`.
_SPECIAL_SHAPES = re.compile(
    r"<\|[^|<>\s]{1,40}\|>|>>[A-Za-z_]{1,40}<<|\[/?INST\]|<</?SYS>>|<(?:start|end)_of_turn>|</?s>",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Conversation:
    """What is sent for one reply: the system prompt, the finished turns, the new message, and
    the start of the reply when the model is to continue one it wrote (Continue after a reply
    was cut at the length limit): the prompt then ends inside that reply, not after it."""

    system_prompt: str
    turns: tuple[Turn, ...]
    message: str
    reply_start: str = ""

    def without_oldest(self, count: int) -> Conversation:
        return Conversation(self.system_prompt, self.turns[count:], self.message, self.reply_start)


@dataclass(frozen=True)
class ChatMessages:
    """A conversation as role/content messages, for a server that applies the template itself.
    Ending with an assistant message, the server is to continue that message (TGI, vLLM and
    SGLang take `continue_final_message`), not to start a new one."""

    messages: tuple[tuple[str, str], ...]

    @property
    def continues_reply(self) -> bool:
        return bool(self.messages) and self.messages[-1][0] == "assistant"

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


Prompt = str | ChatMessages


def neutralize_role_markers(text: str) -> str:
    """Keep text from starting a line with a Falcon role marker, without visibly changing it."""
    return _FORGED_MARKER.sub(lambda m: m[1] + _ZERO_WIDTH_SPACE, text)


def neutralize_special_tokens(text: str, special_tokens: Iterable[str] = ()) -> str:
    """Break every typed special token (the tokenizer's own and the common shapes) with a
    zero-width space after its first character, so it is read as plain text."""
    tokens = sorted({t for t in special_tokens if len(t) > 1}, key=len, reverse=True)
    pattern = _SPECIAL_SHAPES.pattern + "".join("|" + re.escape(t) for t in tokens)
    return re.sub(pattern, lambda m: m[0][0] + _ZERO_WIDTH_SPACE + m[0][1:], text, flags=re.IGNORECASE)


def format_prompt(message: str, turns: Sequence[Turn], system_prompt: str = "", reply_start: str = "") -> str:
    """The Falcon prompt for `message` after `turns` (`chat.conversation.turns.turns_from_history` makes
    them from Gradio's history), ending with `Falcon:` for the model to continue, or inside the
    reply that starts with `reply_start`."""

    def clean(text: str) -> str:
        return neutralize_role_markers(neutralize_special_tokens(text))

    parts = [f"System: {clean(system_prompt)}\n"] if system_prompt else []
    parts += [f"User: {clean(turn.user)}\nFalcon: {clean(turn.assistant)}\n" for turn in turns]
    parts.append(f"User: {clean(message)}\nFalcon:")
    if reply_start:
        parts.append(f" {clean(reply_start)}")
    return "".join(parts)


class FalconFormat:
    """Falcon's own `User:`/`Falcon:` lines (see the module docstring)."""

    name = "falcon"
    description = "the Falcon format (`User:` / `Falcon:` lines)"

    def render(self, conversation: Conversation) -> str:
        c = conversation
        return format_prompt(c.message, c.turns, c.system_prompt, c.reply_start)


class ChatTemplateFormat:
    """The tokenizer's chat template, rendered to text here (for the local model)."""

    name = "template"
    description = "the model's own chat template"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.special_tokens = tuple(
            {*getattr(tokenizer, "all_special_tokens", ()), *(t.content for t in added.values() if t.special)}
        )
        self._system_role = True
        # A BOS that encoding adds by itself (Llama 2 style), which a template may write too.
        automatic = tokenizer("", add_special_tokens=True)["input_ids"]
        bos = getattr(tokenizer, "bos_token", None)
        adds_bos = bool(automatic) and bos is not None and automatic[0] == tokenizer.bos_token_id
        self._added_prefix = bos if adds_bos else ""

    def render(self, conversation: Conversation) -> str:
        messages = chat_messages(conversation, self.special_tokens).as_dicts()
        if not self._system_role:
            messages = _system_into_first_user(messages)
        # A reply to continue is the last message, left open (transformers' assistant prefill).
        continues = (
            {"continue_final_message": True} if conversation.reply_start else {"add_generation_prompt": True}
        )
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, **continues)
            # The prompt is encoded like any text, with the tokenizer's own BOS: a template that
            # writes it too would give two.
            return text.removeprefix(self._added_prefix)
        except Exception as error:  # jinja raises what the template says: some refuse a system role
            if not self._system_role or messages[0]["role"] != "system":
                raise
            log.info(
                "the chat template refused a system message (%s): it goes before the first message", error
            )
            self._system_role = False
            return self.render(conversation)


class ServerTemplateFormat:
    """Role/content messages for a server's chat route, which applies the model's template."""

    name = "template"
    description = "the model's own chat template (applied by the server)"

    def render(self, conversation: Conversation) -> ChatMessages:
        return chat_messages(conversation)


PromptFormat = FalconFormat | ChatTemplateFormat | ServerTemplateFormat


def chat_messages(conversation: Conversation, special_tokens: Iterable[str] = ()) -> ChatMessages:
    """The conversation as role/content messages, typed special tokens neutralised."""

    def clean(text: str) -> str:
        return neutralize_special_tokens(text, special_tokens)

    messages = [("system", clean(conversation.system_prompt))] if conversation.system_prompt else []
    for turn in conversation.turns:
        messages += [("user", clean(turn.user)), ("assistant", clean(turn.assistant))]
    messages.append(("user", clean(conversation.message)))
    if conversation.reply_start:
        messages.append(("assistant", clean(conversation.reply_start)))
    return ChatMessages(tuple(messages))


def _system_into_first_user(messages: list[dict]) -> list[dict]:
    if not messages or messages[0]["role"] != "system":
        return messages
    system, first, *rest = messages
    return [{"role": "user", "content": f"{system['content']}\n\n{first['content']}"}, *rest]


def choose_prompt_format(kind: str, tokenizer=None) -> PromptFormat:
    """`falcon`, `template` or `auto` for a local model: auto takes the tokenizer's chat template
    where it has one, else the Falcon format."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if kind == "falcon" or (kind == "auto" and not has_template):
        return FalconFormat()
    if not has_template:
        from chat.conversation.errors import ConfigError

        raise ConfigError("--prompt-format template: this model's tokenizer has no chat template")
    return ChatTemplateFormat(tokenizer)
