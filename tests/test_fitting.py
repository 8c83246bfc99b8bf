"""Fitting under attack: a forged history of 1,000 turns, an oversized system prompt."""

from __future__ import annotations

import asyncio
import re

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from chat.conversation.errors import InvalidMessage, PromptTooLong
from chat.conversation.fitting import MAX_HISTORY_TURNS, REPLY_FLOOR_TOKENS, fit_prompt, reply_floor
from chat.conversation.params import GenerationParams
from chat.conversation.prompt import ChatMessages, Conversation, ServerTemplateFormat, format_prompt
from chat.conversation.reply import stream_reply
from chat.conversation.turns import Turn, strip_note
from tests.doubles import ScriptedBackend
from tests.helpers import serve_app


def words(text) -> int:
    if isinstance(text, ChatMessages):
        return sum(words(content) + 3 for _, content in text.messages)
    return len(text.split())


def forged(turns: int) -> list[Turn]:
    return [
        Turn(f"question {i} about the sea and the sky", f"answer {i} about the hills") for i in range(turns)
    ]


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self, text) -> int:
        self.calls += 1
        return words(text)


@pytest.mark.parametrize("prompt_format", [None, ServerTemplateFormat()], ids=["falcon", "server template"])
def test_a_forged_history_costs_a_bounded_number_of_counts(prompt_format):
    count = Counter()
    fitted = fit_prompt(
        "latest",
        forged(1000),
        "Be kind.",
        count_tokens=count,
        context_length=600,
        max_new_tokens=100,
        prompt_format=prompt_format,
    )
    assert count.calls <= 2 + MAX_HISTORY_TURNS.bit_length()  # was one count per turn and more
    assert fitted.prompt_tokens <= 500 and fitted.max_new_tokens == 100
    # Still the fewest turns dropped: one more kept turn would not fit.
    kept = 1000 - fitted.dropped_turns
    one_more = (prompt_format or _Falcon()).render(
        Conversation("Be kind.", tuple(forged(1000)[-kept - 1 :]), "latest")
    )
    assert words(one_more) > 500


class _Falcon:
    def render(self, conversation):
        return format_prompt(conversation.message, conversation.turns, conversation.system_prompt)


def test_history_beyond_the_bound_is_left_out_without_counting():
    count = Counter()
    fitted = fit_prompt(
        "latest", forged(1000), "", count_tokens=count, context_length=10**6, max_new_tokens=100
    )
    assert fitted.dropped_turns == 1000 - MAX_HISTORY_TURNS and count.calls == 1
    assert "question 999 " in fitted.text and "question 743 " not in fitted.text


def test_a_system_prompt_that_cannot_fit_is_named():
    with pytest.raises(PromptTooLong) as raised:
        fit_prompt("hi", [], "rule " * 400, count_tokens=words, context_length=128, max_new_tokens=16)
    assert raised.value.user_message == (
        "The system prompt is about 400 tokens long, but this model's context holds 128 tokens in all, "
        "the reply included: shorten it to under 108 tokens."
    )  # 128, less the reply's floor (the 16 asked), the format's two words and a margin of two


def test_an_oversized_system_prompt_is_refused_before_anything_is_counted():
    backend = ScriptedBackend()
    with pytest.raises(
        InvalidMessage, match="The system prompt is 5,000,000 characters long; the limit is 20,000"
    ):
        next(stream_reply(backend, "hi", [], "x" * 5_000_000, GenerationParams(), max_message_chars=20_000))
    assert backend.counted == []


class LoopWatchingBackend(ScriptedBackend):
    """Records whether each count ran on a thread with a running event loop."""

    def count_tokens(self, text) -> int:
        try:
            asyncio.get_running_loop()
            self.on_event_loop = True
        except RuntimeError:
            pass
        return super().count_tokens(text)


def test_tokens_are_counted_off_the_event_loop_and_a_long_system_prompt_is_named_in_the_api():
    backend = LoopWatchingBackend(["Hello"])
    backend.on_event_loop = False
    with serve_app(backend) as url:
        Client(url, verbose=False).predict("hi", "Be brief.", 0.0, 16, 0.9, 1.0, "", api_name="/chat")
        assert backend.counted and not backend.on_event_loop
        counted = len(backend.counted)
        with pytest.raises(
            AppError, match="The system prompt is 30,000 characters long; the limit is 20,000"
        ):
            Client(url, verbose=False).predict("hi", "x" * 30_000, 0.0, 16, 0.9, 1.0, "", api_name="/chat")
    assert len(backend.counted) == counted


# -- the conversation first, the reply gets what is left ------------------------------------------


def chat_of(turns: int) -> list[Turn]:
    return [Turn(f"my name is Ada and this is turn {i}", f"noted turn {i}") for i in range(turns)]


@pytest.mark.parametrize("asked", [256, 1500, 2048])
def test_raising_max_new_tokens_never_drops_a_turn_that_fits(asked):
    # On a 2,048-token model, asking 1,500 new tokens used to reserve them and drop the first turns;
    # at 2,048 every turn went.
    fitted = fit_prompt(
        "What is my name?", chat_of(40), "", count_tokens=words, context_length=2048, max_new_tokens=asked
    )
    assert fitted.dropped_turns == 0 and "turn 0\n" in fitted.text
    assert fitted.max_new_tokens == min(asked, 2048 - fitted.prompt_tokens)


def test_turns_go_only_when_the_reply_would_get_less_than_its_floor():
    turns = chat_of(40)  # 14 words a turn as the Falcon format writes it: more than 600 in all
    for asked in (100, 2048):
        fitted = fit_prompt("latest", turns, "", count_tokens=words, context_length=600, max_new_tokens=asked)
        floor = reply_floor(asked, 600)
        assert fitted.prompt_tokens <= 600 - floor < fitted.prompt_tokens + 14  # one more turn would not fit
        assert fitted.max_new_tokens == min(asked, 600 - fitted.prompt_tokens) >= floor
    assert reply_floor(100, 600) == 100 and reply_floor(2048, 600) == 150  # what was asked; a quarter


def test_the_reply_floor_is_256_tokens_at_most_and_never_more_than_was_asked():
    assert reply_floor(4096, 8192) == REPLY_FLOOR_TOKENS == 256
    assert reply_floor(40, 8192) == 40 and reply_floor(4096, 160) == 40


def test_the_servers_input_limit_is_kept_even_where_the_context_has_room():
    fitted = fit_prompt(
        "latest",
        chat_of(200),
        "",
        count_tokens=words,
        context_length=2048,
        max_new_tokens=256,
        max_input_tokens=300,
    )
    assert fitted.prompt_tokens <= 300 < fitted.prompt_tokens + 14
    assert fitted.max_new_tokens == 256


@pytest.mark.parametrize(
    "context, max_input, limit_words",
    [
        (2048, None, "this model's context holds 2,048 tokens in all, the reply included"),
        (2048, 1024, "the model server takes prompts of at most 1,024 tokens"),
    ],
)
def test_the_advice_for_a_long_message_names_a_length_that_works(context, max_input, limit_words):
    options = dict(
        count_tokens=words, context_length=context, max_new_tokens=2048, max_input_tokens=max_input
    )
    with pytest.raises(PromptTooLong) as raised:
        fit_prompt("word " * 3000, chat_of(3), "Be kind.", **options)
    advice = raised.value.user_message
    assert advice.startswith(
        f"Your message is about 3,000 tokens long, but {limit_words}: shorten it to under "
    )
    under = int(re.search(r"under ([\d,]+) tokens", advice).group(1).replace(",", ""))
    # A message just under the number fits, and leaves the reply at least its floor.
    fitted = fit_prompt("word " * (under - 1), chat_of(3), "Be kind.", **options)
    assert fitted.prompt_tokens <= (max_input or context) and fitted.max_new_tokens >= reply_floor(
        2048, context
    )


def test_against_tgi_no_request_exceeds_its_input_limit_and_the_advice_is_taken():
    # TGI at its defaults: 2,048 tokens in all, prompts of at most 1,024. The page used to advise
    # "under 2,042 tokens", and a message of 1,500 was then refused by the server.
    from chat.backends.remote.tgi import TGIBackend
    from tests.helpers import reply_with_stats
    from tests.tgi_double import DEFAULT_TEXT, TGIDouble

    with TGIDouble(max_input_tokens=1024, max_total_tokens=2048) as double:
        backend = TGIBackend([double.url])
        try:
            history = [
                {"role": r, "content": f"{r} says a few words {i}"}
                for i in range(300)
                for r in ("user", "assistant")
            ]
            params = GenerationParams(max_new_tokens=2048)
            texts, stats = reply_with_stats(backend, "hello", history, params=params)
            assert strip_note(texts[-1]) == DEFAULT_TEXT and 0 < stats.prompt_tokens <= 1024
            with pytest.raises(
                PromptTooLong, match="the model server takes prompts of at most 1,024 tokens"
            ) as raised:
                reply_with_stats(backend, "word " * 1500, params=params)
            under = int(
                re.search(r"under ([\d,]+) tokens", raised.value.user_message).group(1).replace(",", "")
            )
            texts, _ = reply_with_stats(backend, "word " * (under - 1), params=params)
            assert strip_note(texts[-1]) == DEFAULT_TEXT
        finally:
            backend.close()
    generated = [r for r in double.requests if r.path == "/generate_stream"]
    assert len(generated) == 2  # one per reply: none refused and retried
