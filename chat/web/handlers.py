"""What the page's events do: plain async functions over a backend, callable without a server.

`PageHandlers.respond` (the chat), `complete` (raw continuation), `export`, `reply_stats` and
`figures_after_stop` are what `chat/web/page.py` wires to Gradio's events. Both streaming events share
one path (`_stream`): the in-flight gauge, the rejected-request count and the refusal.

A chat reply is shown as a `ShownReply`: the reply message, then its figures (tokens, timings,
how it ended) in a message of their own, outside the words. API callers get only the words
(`ShownReply.text`). A refused request (an empty or too long message, a bad seed, a prompt that
cannot fit) is shown as a one-sentence note in the chat instead of an error: Gradio 6.31 locks
the page when a chat function raises before its first update.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Callable, Iterator

from chat.config import Settings
from chat.conversation.backend import Backend
from chat.conversation.errors import ChatError, InvalidParameter
from chat.conversation.inline_math import shown
from chat.conversation.params import GenerationParams
from chat.conversation.reply import (
    FINISH_WORDS,
    MIN_UPDATE_INTERVAL_S,
    ReplyStats,
    clean_message,
    stream_completion,
    stream_reply,
)
from chat.conversation.stops import decode_escapes, split_unescaped_commas
from chat.conversation.turns import add_note, content_text, figures_message
from chat.web.bridge import UpdatePacer, newest_in_thread
from chat.web.export import conversation_json, conversation_markdown
from chat.web.operations import Operations
from chat.web.security import export_folder

COMPLETION_STOPS = ("<|endoftext|>",)
STOPPED_NOTE = "Stopped."
# How long the figures of a stopped reply are waited for (the reply's thread ends within ~0.1 s).
STOPPED_FIGURES_WAIT_S = 3.0


class Refused(Exception):
    """A request turned away before anything was generated; `reason` is one sentence for the user."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class ShownReply(list):
    """A chat reply as the page shows it: a list of messages for Gradio's ChatInterface (the reply,
    then its figures), carrying `text`, the reply as the model wrote it (what `/chat` returns), and
    `refused`, the reason when the request was turned away."""

    def __init__(self, text: str, stats: ReplyStats | None = None, *, refused: str | None = None):
        messages = [{"role": "assistant", "content": add_note("", refused) if refused else shown(text)}]
        if stats is not None:
            messages.append(figures_message(stats_line(stats)))
        super().__init__(messages)
        self.text = text
        self.refused = refused


class PageHandlers:
    """The functions behind the page's events, for one backend."""

    def __init__(self, backend: Backend, settings: Settings, operations: Operations):
        self.backend = backend
        self.settings = settings
        self.operations = operations
        self.pacer = UpdatePacer(settings.page_updates, MIN_UPDATE_INTERVAL_S)
        # Called in a running event: a check of whether its page or API client has gone, or None
        # (chat/web/page.py gives Gradio's view of it).
        self.event_gone: Callable[[], Callable[[], bool] | None] = lambda: None

    async def respond(
        self,
        message,
        history,
        system_prompt,
        temperature,
        max_new_tokens,
        top_p,
        repetition_penalty,
        seed=None,
        session=None,
    ) -> AsyncIterator[ShownReply]:
        """The chat: the growing reply, then the reply with its figures; a refusal as a note."""
        ended: list[ReplyStats] = []
        done = threading.Event()
        if isinstance(session, dict):
            session["reply_done"] = done

        def on_finish(stats: ReplyStats) -> None:
            ended.append(stats)
            if isinstance(session, dict):
                session["last_reply"] = stats.as_dict()
                session["last_stats"] = stats
            done.set()

        def reply(cancelled: threading.Event, finished: Callable) -> Iterator[str]:
            params = self.params(temperature, max_new_tokens, top_p, repetition_penalty, seed)
            return stream_reply(
                self.backend,
                message,
                history,
                system_prompt,  # stream_reply refuses anything but text
                params,
                max_message_chars=self.settings.max_message_chars,
                on_finish=finished,
                cancelled=cancelled,  # a Cancellation: also interrupts a blocked read
            )

        text = ""
        try:
            async for text in self._stream("chat", reply, message, on_finish):
                yield ShownReply(text)
        except Refused as refusal:
            done.set()
            yield ShownReply("", refused=refusal.reason)
            return
        yield ShownReply(text, ended[-1] if ended else None)

    async def complete(self, text, temperature, max_new_tokens, top_p, repetition_penalty, seed, stop):
        """Raw continuation of `text`, for base models; a refusal raises `Refused`."""

        def reply(cancelled: threading.Event, finished: Callable) -> Iterator[str]:
            stops = COMPLETION_STOPS + tuple(parse_stops(stop))
            params = self.params(temperature, max_new_tokens, top_p, repetition_penalty, seed, stops)
            return stream_completion(
                self.backend,
                text,
                params,
                max_message_chars=self.settings.max_message_chars,
                on_finish=finished,
                cancelled=cancelled,  # a Cancellation: also interrupts a blocked read
            )

        async for continuation in self._stream("completion", reply, text):
            yield continuation

    async def _stream(
        self,
        mode: str,
        reply: Callable[[threading.Event, Callable[[ReplyStats], None]], Iterator[str]],
        message,
        on_finish: Callable[[ReplyStats], None] | None = None,
    ) -> AsyncIterator[str]:
        """The path both streaming events share: `reply(cancelled, finished)` runs in a thread of
        its own (chat.web.bridge), counted in flight meanwhile, and is cancelled if the session
        goes; its figures are recorded (metrics, log) when it ends, then handed to `on_finish`;
        a request error is counted and becomes `Refused`."""

        def finished(stats: ReplyStats) -> None:
            self.operations.record_reply(mode, stats, message)
            if on_finish is not None:
                on_finish(stats)

        self.operations.in_flight.inc()
        try:
            make = functools.partial(reply, finished=finished)
            gone = self.event_gone()
            async for text in newest_in_thread(make, pacer=self.pacer, name=f"{mode}-reply", abandoned=gone):
                yield text
        except ChatError as error:
            self.operations.record_rejected(mode, type(error).__name__)
            raise Refused(error.user_message) from None
        finally:
            self.operations.in_flight.dec()

    def message_problem(self, message) -> str | None:
        """Why `message` cannot be sent as it is (empty, too long), or None: checked on the page
        before sending, so the typed text stays in the box."""
        try:
            clean_message(message, self.settings.max_message_chars)
        except ChatError as error:
            return error.user_message
        return None

    def params(self, temperature, max_new_tokens, top_p, repetition_penalty, seed, stops=None):
        return GenerationParams.from_request(
            self.settings.default_params,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=parse_seed(seed),
            stop_sequences=stops,
        )

    async def figures_after_stop(self, history, session) -> list:
        """After Stop: the stopped reply marked as stopped, with its figures under it; stopped
        before its first word, the message gets a reply that is only the note (else it hung
        there unanswered)."""
        done = session.get("reply_done") if isinstance(session, dict) else None
        if done is None:
            return history
        await asyncio.to_thread(done.wait, STOPPED_FIGURES_WAIT_S)
        stats = session.get("last_stats")
        history = list(history or [])
        if stats is None or not history or _is_figures(history[-1]):
            return history
        if _role(history[-1]) == "assistant":
            text = content_text(_content(history[-1]))
            history[-1] = {"role": "assistant", "content": add_note(text, STOPPED_NOTE)}
        else:
            history.append({"role": "assistant", "content": add_note("", STOPPED_NOTE)})
        history.append(figures_message(stats_line(stats)))
        return history

    def export(self, history, system_prompt) -> list[str]:
        """The conversation as a Markdown and a JSON file; their paths."""
        folder = export_folder()  # private, the newest 64 MiB kept, removed at exit
        options = dict(system_prompt=system_prompt or "", model_name=self.backend.model_name)
        markdown, json_file = folder / "conversation.md", folder / "conversation.json"
        markdown.write_text(conversation_markdown(history, **options), encoding="utf-8")
        json_file.write_text(conversation_json(history, **options), encoding="utf-8")
        return [str(markdown), str(json_file)]

    @staticmethod
    def reply_stats(session) -> dict | None:
        """The figures of this session's last reply (`/reply_stats`)."""
        return (session or {}).get("last_reply") if isinstance(session, dict) else None


def stats_line(stats: ReplyStats) -> str:
    """The figures of a reply: tokens, time to first token, speed, how it ended, seed, context.
    Its start ("N tokens · ") is how assets/page.js knows them in what Gradio copies."""
    parts = [f"{stats.generated_tokens} tokens"]
    if stats.time_to_first_token_s is not None:
        parts.append(f"first token {stats.time_to_first_token_s:.2f} s")
    if stats.tokens_per_s:
        parts.append(f"{stats.tokens_per_s:.1f} tokens/s")
    parts.append(FINISH_WORDS.get(stats.finish_reason, stats.finish_reason))
    if stats.seed is not None:
        parts.append(f"seed {stats.seed}")
    if stats.proposed_tokens:
        parts.append(f"{stats.accepted_tokens:,} of {stats.proposed_tokens:,} proposed tokens accepted")
    if stats.context_length:
        used = stats.prompt_tokens + stats.generated_tokens
        parts.append(f"context {used:,}/{stats.context_length:,} ({100 * used / stats.context_length:.0f}%)")
    if stats.dropped_turns:
        turns = "turn" if stats.dropped_turns == 1 else "turns"
        parts.append(f"{stats.dropped_turns} older {turns} left out to fit")
    return " · ".join(parts)


def parse_seed(raw):
    """The seed box's text (or an API number) as a seed; empty means a random one."""
    if isinstance(raw, str):
        raw = raw.strip()
        if not raw:
            return None
        try:
            return int(raw)
        except ValueError:
            raise InvalidParameter(f"The seed must be a whole number or empty, not {raw[:20]!r}.") from None
    return raw


def parse_stops(raw) -> list[str]:
    """The Completion tab's "Stop at" box: comma-separated, with the escapes `--stop` takes."""
    if not isinstance(raw, str) or not raw:
        return []
    return [decode_escapes(stop) for stop in split_unescaped_commas(raw)]


def _role(message):
    return message.get("role") if isinstance(message, dict) else getattr(message, "role", None)


def _content(message):
    return message.get("content") if isinstance(message, dict) else getattr(message, "content", None)


def _is_figures(message) -> bool:
    """A message with a title is a display the app added (the figures), not a reply."""
    metadata = message.get("metadata") if isinstance(message, dict) else getattr(message, "metadata", None)
    title = metadata.get("title") if isinstance(metadata, dict) else getattr(metadata, "title", None)
    return bool(title)
