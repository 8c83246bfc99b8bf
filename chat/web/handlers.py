"""What the page's events do: plain async functions over a backend, callable without a server.

`PageHandlers.respond` (a chat reply), `reply` (the page's reply to its own request),
`figures_after_stop`, `complete` (raw continuation), `export` and `reply_stats` are what
chat/web/chat_events.py and chat/web/page.py wire to Gradio's events. Both streaming paths share
one (`_stream`): the in-flight gauge, the rejected-request count and the refusal.

The conversation lives in the browser (assets/chats.js keeps it); the page sends what the reply
needs (a `request`: the conversation, or only its newest part where it is long) and gets back only
the reply, on a channel of its own (`ReplyUpdate`). A chat reply is shown as a `ShownReply`: the
reply message, then its figures (tokens, timings, how it ended) in a message of their own, outside
the words, with what the person can do next under it: Continue for a reply cut at the length
limit, Retry for one that failed. API callers get only the words (`ShownReply.text`). A refused
request (an empty or too long message, a bad seed, a prompt that cannot fit) is a one-sentence
note in the chat, with Retry.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime

from chat.config import Settings
from chat.conversation.backend import FINISH_LENGTH, Backend
from chat.conversation.errors import ChatError, InvalidParameter
from chat.conversation.inline_math import shown, written
from chat.conversation.params import GenerationParams
from chat.conversation.reply import (
    FINISH_ERROR,
    FINISH_WORDS,
    MIN_UPDATE_INTERVAL_S,
    ReplyStats,
    clean_message,
    stream_completion,
    stream_reply,
)
from chat.conversation.stops import decode_escapes, split_unescaped_commas
from chat.conversation.turns import (
    ShownMessage,
    add_note,
    page_message,
    shown_messages,
    strip_note,
)
from chat.web.bridge import UpdatePacer, newest_in_thread
from chat.web.export import conversation_json, conversation_markdown
from chat.web.operations import Operations
from chat.web.security import export_folder

COMPLETION_STOPS = ("<|endoftext|>",)
STOPPED_NOTE = "Stopped."
LENGTH_NOTE = "The reply stopped at the length limit ({tokens:,} new tokens): Continue lets the model go on."
CONTINUE, RETRY = "Continue", "Retry"  # the buttons offered under a reply (Gradio's message options)
NOTHING_TO_ANSWER = "There is no message to reply to."
# The longest request id, and chat title in an export's file name, taken from the page.
MAX_REQUEST_ID = 64
MAX_TITLE_IN_NAME = 40
# How long the figures of a stopped reply are waited for (the reply's thread ends within ~0.1 s).
STOPPED_FIGURES_WAIT_S = 3.0


class Refused(Exception):
    """A request turned away before anything was generated; `reason` is one sentence for the user."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class ShownReply(list):
    """A chat reply as the page shows it: its messages in the shape the page's Chatbot keeps (the
    reply, then its figures), carrying `text`, the reply as the model wrote it (what `/chat`
    returns), and `refused`, the reason when the request was turned away. A reply cut at the
    length limit says so in words and offers Continue; a failed or refused one offers Retry."""

    def __init__(self, text: str, stats: ReplyStats | None = None, *, refused: str | None = None):
        content = add_note("", refused) if refused else shown(text)
        offered: tuple[str, ...] = (RETRY,) if refused else ()
        if stats is not None and stats.finish_reason == FINISH_LENGTH:
            content = add_note(content, LENGTH_NOTE.format(tokens=stats.generated_tokens))
            offered = (CONTINUE,)
        elif stats is not None and stats.finish_reason == FINISH_ERROR:
            offered = (RETRY,)
        if stats is None:
            messages = [page_message("assistant", content, options=offered)]
        else:
            figures = page_message("assistant", "", title=stats_line(stats), options=offered)
            messages = [page_message("assistant", content), figures]
        super().__init__(messages)
        self.text = text
        self.refused = refused


def reply_update(request_id: str, messages: list[dict]) -> str:
    """What the reply channel carries to the page: the request it answers, the reply's messages."""
    return json.dumps({"id": request_id, "messages": messages}, ensure_ascii=False)


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
        *,
        reply_start: str = "",
        omitted_turns: int = 0,
    ) -> AsyncIterator[ShownReply]:
        """The chat: the growing reply, then the reply with its figures; a refusal as a note.
        With `reply_start`, the model continues that reply; `omitted_turns` older turns were not
        sent at all (the page keeps a long conversation's request under the size limit)."""
        ended: list[ReplyStats] = []
        done = threading.Event()
        if isinstance(session, dict):
            session["reply_done"] = done

        def on_finish(stats: ReplyStats) -> None:
            stats.dropped_turns += omitted_turns
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
                reply_start=reply_start,
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

    async def reply(self, request, *settings) -> AsyncIterator[str]:
        """The page's reply to `request` (from the page's script, so untrusted): `{"id", "messages",
        "omitted", "option"}`, the conversation as the page keeps it, or its newest part. Its last
        message is answered; with the option "continue" (a button under the last reply) that
        reply is continued instead, with "retry" written anew. `settings`: `respond`'s, from the
        system prompt to the session. Yields `reply_update`s: the reply so far, then its figures."""
        request_id, messages, omitted = read_request(request)
        option = request.get("option") if isinstance(request, dict) else None
        session = settings[-1] if settings and isinstance(settings[-1], dict) else {}
        session["reply_id"] = request_id  # which reply a Stop is about (figures_after_stop)
        if isinstance(request, dict) and request.get("stopped") is True:  # Stop came first
            session["reply_done"] = None  # nothing is generated: no figures to wait for
            yield reply_update(request_id, [page_message("assistant", add_note("", STOPPED_NOTE))])
            return
        asked = _last_user_message(messages)
        if asked is None:
            yield reply_update(request_id, ShownReply("", refused=NOTHING_TO_ANSWER))
            return
        reply_start = ""
        if option == "continue":
            replies = [
                strip_note(m.text) for m in messages[asked + 1 :] if m.role == "assistant" and not m.title
            ]
            reply_start = written("\n".join(reply for reply in replies if reply)).strip()
        history = [
            {"role": m.role, "content": m.text, "metadata": {"title": m.title}} for m in messages[:asked]
        ]
        message = messages[asked].text
        options = dict(reply_start=reply_start, omitted_turns=omitted)
        async for shown_reply in self.respond(message, history, *settings, **options):
            yield reply_update(request_id, shown_reply)

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

    async def figures_after_stop(self, reply_so_far, session) -> str:
        """After Stop: the stopped reply (`reply_so_far`, the channel's value from the page) marked as
        stopped, with its figures under it; stopped before its first word, the reply is only the
        note (else the message hung there unanswered)."""
        request_id, messages, _ = read_request(reply_so_far)
        done = session.get("reply_done") if isinstance(session, dict) else None
        if done is None or session.get("reply_id") != request_id:
            # This reply never reached the server (Stop came first: the page sends it as stopped),
            # so no figures of its own are coming; what the page has stays as it is.
            return reply_update(request_id, [_as_page(m) for m in messages])
        await asyncio.to_thread(done.wait, STOPPED_FIGURES_WAIT_S)
        stats = session.get("last_stats")
        if stats is None or (messages and messages[-1].title):
            return reply_update(request_id, [_as_page(m) for m in messages])  # already finished
        words = next((m.text for m in messages if m.role == "assistant" and not m.title), "")
        stopped = [page_message("assistant", add_note(words, STOPPED_NOTE))]
        stopped.append(page_message("assistant", "", title=stats_line(stats)))  # the figures
        return reply_update(request_id, stopped)

    def export(self, history, system_prompt, about=None) -> list[str]:
        """The conversation as a Markdown and a JSON file, named after the chat and its time
        (`about`, from the page: `{"title", "time"}`); their paths."""
        folder = export_folder()  # private, the newest 64 MiB kept, removed at exit
        system_prompt = system_prompt if isinstance(system_prompt, str) else ""  # from the page: any JSON
        options = dict(system_prompt=system_prompt, model_name=self.backend.model_name)
        name = export_name(about)
        markdown, json_file = folder / f"{name}.md", folder / f"{name}.json"
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


def read_request(request) -> tuple[str, list[ShownMessage], int]:
    """The page's request (or a reply channel's value), checked: its id, its messages, and how many
    older turns the page left out. Anything malformed reads as no messages."""
    if isinstance(request, str):
        try:
            request = json.loads(request)
        except ValueError:
            request = None
    if not isinstance(request, dict):
        return "", [], 0
    request_id = request.get("id")
    request_id = request_id[:MAX_REQUEST_ID] if isinstance(request_id, str) else ""
    messages = request.get("messages")
    omitted = request.get("omitted")
    omitted = omitted if isinstance(omitted, int) and not isinstance(omitted, bool) and omitted > 0 else 0
    return request_id, shown_messages(messages if isinstance(messages, list) else []), omitted


def export_name(about) -> str:
    """`falcon-chat-<the chat's title>-<its time>`, in letters, digits and dashes only (both come
    from the page): `about` is `{"title", "time"}`, time as the page's clock shows it."""
    about = about if isinstance(about, dict) else {}
    title, time = about.get("title"), about.get("time")
    slug = (
        re.sub(r"[^a-z0-9]+", "-", title.lower())[:MAX_TITLE_IN_NAME].strip("-")
        if isinstance(title, str)
        else ""
    )
    stamp = (
        re.fullmatch(r"(\d{4})-(\d\d)-(\d\d)[ T](\d\d):(\d\d)", time.strip())
        if isinstance(time, str)
        else None
    )
    stamp = (
        "-".join(stamp.groups()[:3]) + "-" + "".join(stamp.groups()[3:])
        if stamp
        else datetime.now().strftime("%Y-%m-%d-%H%M")
    )
    return "-".join(part for part in ("falcon-chat", slug or "conversation", stamp) if part)


def _last_user_message(messages: list[ShownMessage]) -> int | None:
    return next((i for i in range(len(messages) - 1, -1, -1) if messages[i].role == "user"), None)


def _as_page(message: ShownMessage) -> dict:
    return page_message(message.role or "assistant", message.text, title=message.title)
