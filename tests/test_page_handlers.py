"""chat.web.handlers without a server: what each event of the page does, called directly."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from chat.config import Settings
from chat.conversation.backend import FINISH_CANCELLED, Backend, Token
from chat.conversation.inline_math import CLOSE, OPEN, shown, written
from chat.conversation.reply import ReplyStats
from chat.conversation.turns import content_text, turns_from_history
from chat.web.export import conversation_json, conversation_markdown
from chat.web.handlers import PageHandlers, Refused, ShownReply, export_name, stats_line
from chat.web.operations import Operations
from tests.doubles import FailingBackend

SETTINGS = (0.0, 20, 0.9, 1.0)  # temperature, max new tokens, top-p, repetition penalty


class Words(Backend):
    """Streams its words, one token each, then ends its turn; notes the in-flight gauge as it goes."""

    name = "words"
    model_name = "words model"

    def __init__(self, words=("Hello ", "there"), gauge=None):
        self.words, self.gauge, self.seen_in_flight, self.prompts = words, gauge, [], []

    def context_length(self) -> int:
        return 100

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def stream(self, prompt, params):
        self.prompts.append(prompt)
        for index, word in enumerate(self.words):
            if index == params.max_new_tokens:
                yield Token("", finish_reason="length", seed=params.seed)
                return
            if self.gauge is not None:
                self.seen_in_flight.append(self.gauge._value.get())
            yield Token(word, id=index)
        yield Token("", finish_reason="stop", seed=params.seed)


def handlers_for(backend: Backend, **settings) -> PageHandlers:
    operations = Operations(backend)
    if isinstance(backend, Words):
        backend.gauge = operations.in_flight
    return PageHandlers(backend, Settings(**settings), operations)


def collect(updates) -> list:
    async def run():
        return [update async for update in updates]

    return asyncio.run(run())


def counted(operations: Operations, mode: str, outcome: str) -> float:
    return operations.requests.labels(mode, outcome)._value.get()


def text(message: dict) -> str:
    return content_text(message["content"])


def offered(message: dict) -> list[str]:
    """The buttons offered under a message (Gradio's message options)."""
    return [option["label"] for option in message.get("options") or ()]


def test_a_chat_reply_streams_then_ends_with_its_figures_in_a_message_of_their_own():
    handlers = handlers_for(Words())
    session = {}
    updates = collect(handlers.respond("Hi", [], "", 0.7, *SETTINGS[1:], "7", session))  # sampled

    assert all(isinstance(update, ShownReply) for update in updates)
    last = updates[-1]
    assert last.text == "Hello there" and text(last[0]) == "Hello there"
    figures = last[1]["metadata"]["title"]
    assert "2 tokens" in figures and "end of turn" in figures and "seed 7" in figures
    assert text(last[1]) == "" and offered(last[1]) == []  # nothing but the title; nothing to retry
    assert session["last_reply"]["generated_tokens"] == 2
    # The figures are a display: the next prompt gets the reply's words only.
    assert turns_from_history([{"role": "user", "content": "Hi"}, *last])[0].assistant == "Hello there"


@pytest.mark.parametrize(
    "message, seed, reason",
    [
        ("   ", None, "Please type a message first."),
        ("x" * 50, None, "the limit is 40"),
        ("Hi", "lucky", "The seed must be a whole number"),
        ("word " * 120, None, "context"),
    ],
)
def test_a_refused_chat_request_is_a_note_in_the_chat_and_counted(message, seed, reason):
    handlers = handlers_for(Words(), max_message_chars=40 if len(message) == 50 else 20_000)
    updates = collect(handlers.respond(message, [], "", 0.0, 90, 0.9, 1.0, seed, {}))

    (refusal,) = updates
    assert reason in refusal.refused and reason in text(refusal[0])
    assert refusal.text == "" and len(refusal) == 1  # no figures: nothing was generated
    assert offered(refusal[0]) == ["Retry"]  # asked again once fixed, not typed again
    assert counted(handlers.operations, "chat", "rejected") == 1
    assert handlers.operations.in_flight._value.get() == 0


def test_chat_and_completion_count_themselves_in_flight_while_they_stream():
    for mode in ("chat", "completion"):
        backend = Words()
        handlers = handlers_for(backend)
        if mode == "chat":
            collect(handlers.respond("Hi", [], "", *SETTINGS, None, {}))
        else:
            collect(handlers.complete("Once upon", *SETTINGS, None, ""))
        assert backend.seen_in_flight == [1, 1], mode
        assert handlers.operations.in_flight._value.get() == 0
        assert counted(handlers.operations, mode, "stop") == 1


def test_a_refused_completion_raises_refused_and_is_counted():
    handlers = handlers_for(Words())
    with pytest.raises(Refused, match="Please type the text to continue first"):
        collect(handlers.complete("", *SETTINGS, None, ""))
    assert counted(handlers.operations, "completion", "rejected") == 1


def test_a_failing_backend_leaves_the_partial_reply_its_note_and_figures():
    handlers = handlers_for(FailingBackend())
    last = collect(handlers.respond("Hi", [], "", *SETTINGS, None, {}))[-1]
    assert last.text.startswith("Partial reply") and "Reply cut short" in last.text
    assert "error" in last[1]["metadata"]["title"] and offered(last[1]) == ["Retry"]


def test_a_reply_cut_at_the_length_limit_says_so_in_words_and_offers_continue():
    handlers = handlers_for(Words(words=("one ", "two ", "three ", "four")))
    last = collect(handlers.respond("Count", [], "", 0.0, 2, 0.9, 1.0, None, {}))[-1]
    assert last.text == "one two"  # the API's words: no note
    assert text(last[0]).startswith("one two") and "length limit (2 new tokens)" in text(last[0])
    assert offered(last[1]) == ["Continue"]
    assert turns_from_history([{"role": "user", "content": "Count"}, *last])[0].assistant == "one two"


def stopped(handlers, session, reply_so_far) -> list[dict]:
    """What the page shows after Stop, given the reply's messages so far (the channel's value)."""
    session["reply_id"] = "r1"  # the reply Stop is about, as `PageHandlers.reply` notes it
    update = asyncio.run(
        handlers.figures_after_stop(json.dumps({"id": "r1", "messages": reply_so_far}), session)
    )
    answer = json.loads(update)
    assert answer["id"] == "r1"  # the page merges it into the reply it belongs to
    return answer["messages"]


def test_after_stop_the_reply_is_marked_stopped_and_gets_its_figures():
    handlers = handlers_for(Words())
    session = {}
    collect(handlers.respond("Hi", [], "", *SETTINGS, None, session))
    session["last_stats"] = ReplyStats(generated_tokens=3, finish_reason=FINISH_CANCELLED)

    reply = stopped(
        handlers, session, [{"role": "assistant", "content": [{"type": "text", "text": "Hello th"}]}]
    )

    shown = [{"role": "user", "content": "Hi"}, *reply]
    assert text(shown[1]).startswith("Hello th") and "Stopped." in text(shown[1])
    assert "stopped by user" in shown[2]["metadata"]["title"]
    assert turns_from_history(shown)[0].assistant == "Hello th"
    markdown = conversation_markdown(shown)
    assert "**Assistant:** Hello th" in markdown and "> Stopped." in markdown
    assert json.loads(conversation_json(shown))["messages"][1] == {
        "role": "assistant",
        "content": "Hello th",
        "note": "Stopped.",
    }


def test_a_reply_stopped_before_its_first_word_is_the_note_alone_with_its_figures():
    handlers = handlers_for(Words())
    session = {}
    collect(handlers.respond("Hi", [], "", *SETTINGS, None, session))
    session["last_stats"] = ReplyStats(generated_tokens=0, finish_reason=FINISH_CANCELLED)

    shown = [{"role": "user", "content": "Hi"}, *stopped(handlers, session, [])]

    assert [message["role"] for message in shown] == ["user", "assistant", "assistant"]
    assert "Stopped." in text(shown[1]) and "stopped by user" in shown[2]["metadata"]["title"]
    assert turns_from_history(shown) == []  # nothing the model said, so nothing for its prompt


def reply_to(handlers, messages, *, option=None, omitted=0, max_new_tokens=20) -> dict:
    """The page's reply to a request of `messages` (plain role/text pairs): its last update."""
    request = {
        "id": "req-1",
        "messages": [{"role": role, "content": [{"type": "text", "text": said}]} for role, said in messages],
        "omitted": omitted,
        "option": option,
    }
    settings = ("", 0.0, max_new_tokens, 0.9, 1.0, None, {})
    updates = collect(handlers.reply(request, *settings))
    assert all(json.loads(update)["id"] == "req-1" for update in updates)
    return json.loads(updates[-1])


def test_the_page_gets_only_the_reply_to_its_request():
    backend = Words()
    answer = reply_to(
        handlers_for(backend), [("user", "Hi"), ("assistant", "Hello there"), ("user", "And you?")]
    )
    assert [message["role"] for message in answer["messages"]] == ["assistant", "assistant"]
    assert text(answer["messages"][0]) == "Hello there"
    assert backend.prompts[-1] == "User: Hi\nFalcon: Hello there\nUser: And you?\nFalcon:"


def test_continue_resumes_the_reply_in_the_same_message():
    backend = Words(words=(" and", " more"))
    cut = "Hello there\n\n> ⚠️ The reply stopped at the length limit (2 new tokens): Continue lets the model go on."
    answer = reply_to(
        handlers_for(backend), [("user", "Hi"), ("assistant", cut), ("assistant", "")], option="continue"
    )
    # The prompt ends inside the reply, and the reply grows as one message: the note is gone.
    assert backend.prompts[-1] == "User: Hi\nFalcon: Hello there"
    assert text(answer["messages"][0]) == "Hello there and more"
    assert "2 tokens" in answer["messages"][1]["metadata"]["title"]  # the continuation's own figures


def test_retry_under_a_failed_reply_asks_its_message_again():
    backend = Words()
    failed = "> ⚠️ The model server could not be reached. Please try again in a moment."
    answer = reply_to(handlers_for(backend), [("user", "Hi"), ("assistant", failed)], option="retry")
    assert backend.prompts[-1] == "User: Hi\nFalcon:"
    assert text(answer["messages"][0]) == "Hello there"


def test_turns_the_page_left_out_for_size_are_counted_among_those_the_model_did_not_see():
    answer = reply_to(handlers_for(Words()), [("user", "Hi")], omitted=3)
    assert "3 older turns left out" in answer["messages"][1]["metadata"]["title"]


@pytest.mark.parametrize(
    "request_", [None, "not json", {"id": 5, "messages": "no"}, {"messages": [{"role": "assistant"}]}]
)
def test_a_request_with_nothing_to_answer_gets_a_sentence(request_):
    updates = collect(handlers_for(Words()).reply(request_, "", *SETTINGS, None, {}))
    (update,) = [json.loads(update) for update in updates]
    assert text(update["messages"][0]) == "> ⚠️ There is no message to reply to."


@pytest.mark.parametrize(
    "about, name",
    [
        (
            {"title": "Plan a trip to Lisbon!", "time": "2026-12-08 14:32"},
            "falcon-chat-plan-a-trip-to-lisbon-2026-12-08-1432",
        ),
        ({"title": "../../etc/passwd", "time": "2026-12-08 14:32"}, "falcon-chat-etc-passwd-2026-12-08-1432"),
        ({"title": "日本語", "time": "2026-01-02 03:04"}, "falcon-chat-conversation-2026-01-02-0304"),
    ],
)
def test_exported_files_are_named_after_the_chat_and_its_time(about, name):
    assert export_name(about) == name


def test_an_export_name_from_a_bad_time_takes_the_servers_clock():
    assert re.fullmatch(
        r"falcon-chat-hi-\d{4}-\d\d-\d\d-\d{4}", export_name({"title": "Hi", "time": "<script>"})
    )


def test_stats_line_says_how_the_reply_ended_and_what_was_left_out():
    stats = ReplyStats(prompt_tokens=90, context_length=100, generated_tokens=5, dropped_turns=2)
    line = stats_line(stats)
    assert "5 tokens" in line and "context 95/100 (95%)" in line and "2 older turns left out" in line


@pytest.mark.parametrize(
    "text, math",
    [
        ("Between $5 and $10.", "Between $5 and $10."),
        ("It costs $5.", "It costs $5."),
        ("Area $\\pi r^2$ here", f"Area {OPEN}\\pi r^2{CLOSE} here"),
        ("So $x$ and $y$.", f"So {OPEN}x{CLOSE} and {OPEN}y{CLOSE}."),
        ("Block $$x^2$$ stays", "Block $$x^2$$ stays"),
        ("Code `echo $HOME $PATH` and ```\n$a$\n```", "Code `echo $HOME $PATH` and ```\n$a$\n```"),
        ("\\(a+b\\) already", "\\(a+b\\) already"),
    ],
)
def test_inline_dollar_math_is_marked_as_math_but_prices_and_code_stay_text(text, math):
    assert shown(text) == math
    assert written(shown(text)) == text


def as_the_browser_sends(messages) -> list[dict]:
    """Messages as the page sends them back: each content a list of text parts."""
    return [{**message, "content": [{"type": "text", "text": text(message)}]} for message in messages]


def test_the_next_prompt_gets_the_reply_as_the_model_wrote_it_without_its_figures():
    written = "Between $5 and $10. The area is $\\pi r^2$, and \\(a^2 + b^2 = c^2\\)."
    backend = Words(words=(written,))
    handlers = handlers_for(backend)
    shown = collect(handlers.respond("Some math", [], "", *SETTINGS, None, {}))[-1]
    history = as_the_browser_sends([{"role": "user", "content": "Some math"}, *shown])

    collect(handlers.respond("And now?", history, "", *SETTINGS, None, {}))

    assert f"User: Some math\nFalcon: {written}\nUser: And now?\nFalcon:" in backend.prompts[-1]
    assert "tokens" not in backend.prompts[-1]  # the figures never reach the model
    assert json.loads(conversation_json(history))["messages"][1]["content"] == written
    assert f"**Assistant:** {written}" in conversation_markdown(history)


def test_the_completion_stop_box_takes_the_escapes_the_stop_flag_takes():
    from chat.web.handlers import parse_stops

    assert parse_stops("\\n,###") == ["\n", "###"]
    assert parse_stops("a\\,b,\\tUtilisateur é:,用户:") == ["a,b", "\tUtilisateur é:", "用户:"]


def test_a_reply_stopped_before_it_was_asked_for_is_only_marked_stopped():
    """Stop can come before the page's request does (a busy page): nothing is generated, and Stop's
    own step leaves the note as it is, with no figures of another reply."""
    backend = Words()
    handlers = handlers_for(backend)
    session = {}
    collect(handlers.respond("Earlier", [], "", *SETTINGS, None, session))  # figures of another reply
    request = {"id": "late", "messages": [{"role": "user", "content": "Hi"}], "stopped": True}
    (update,) = [json.loads(u) for u in collect(handlers.reply(request, "", *SETTINGS, None, session))]
    assert [text(m) for m in update["messages"]] == ["> ⚠️ Stopped."] and len(backend.prompts) == 1
    after = json.loads(asyncio.run(handlers.figures_after_stop(json.dumps(update), session)))
    assert after == update  # no figures: none belong to it
