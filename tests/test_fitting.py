"""Fitting under attack: a forged history of 1,000 turns, an oversized system prompt."""

from __future__ import annotations

import asyncio

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from chat.conversation.errors import InvalidMessage, PromptTooLong
from chat.conversation.fitting import MAX_HISTORY_TURNS, fit_prompt
from chat.conversation.params import GenerationParams
from chat.conversation.prompt import ChatMessages, Conversation, ServerTemplateFormat, format_prompt
from chat.conversation.reply import stream_reply
from chat.conversation.turns import Turn
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
        "The system prompt is about 400 tokens long, but this model's context holds 128 tokens in all: "
        "shorten it to under 125 tokens."  # 128, less the format's two words and one for the reply
    )


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
