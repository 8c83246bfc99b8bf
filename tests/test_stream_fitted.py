"""`reply.stream_fitted`, the loop every reply and completion runs, driven directly: a `fit` that
records what it was asked, and backends that stream, fail, overflow or get cancelled."""

from __future__ import annotations

import pytest

from chat.conversation.backend import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, Token
from chat.conversation.errors import BackendUnavailable, ContextOverflow
from chat.conversation.fitting import FittedPrompt
from chat.conversation.params import GenerationParams
from chat.conversation.reply import EMPTY_REPLY_NOTE, LINEAR_RETRIES, stream_fitted
from chat.conversation.turns import NOTE_MARK, note_of, strip_note
from tests.doubles import ScriptedBackend


class Fit:
    """A `fit(drop)` that records each call and fits `turns` turns of `turn_tokens` each."""

    def __init__(self, *, turns: int = 0, dropped: int = 0, context: int = 100, reply: int = 20):
        self.turns, self.dropped, self.context, self.reply = turns, dropped, context, reply
        self.asked: list[int] = []

    def __call__(self, drop: int) -> FittedPrompt:
        self.asked.append(drop)
        dropped = max(drop, self.dropped)
        return FittedPrompt(f"prompt without {dropped} turns", 10, self.reply, dropped, self.context)


class StreamBackend(ScriptedBackend):
    """Scripted tokens, then optionally an error; records whether its stream was closed, as a
    closed stream is how a real backend learns to stop generating."""

    def __init__(self, pieces=("Hello", " world"), *, then=None, finish=FINISH_STOP, overflows=0):
        super().__init__(pieces)
        self.then, self.finish, self.overflows = then, finish, overflows
        self.closed = 0

    def stream(self, prompt, params):
        self.prompts.append(prompt)
        self.params.append(params)
        try:
            if len(self.prompts) <= self.overflows:
                raise ContextOverflow(detail="inputs must have less than 10 tokens")
            for index, piece in enumerate(self.pieces):
                yield Token(piece, id=index)
            if self.then is not None:
                raise self.then
            yield Token("", finish_reason=self.finish)
        finally:
            self.closed += 1


def run(backend, fit=None, params=None, **options):
    """Every text shown, and the stats handed to on_finish (exactly once)."""
    finished = []
    texts = list(
        stream_fitted(
            backend, fit or Fit(), params or GenerationParams(), on_finish=finished.append, **options
        )
    )
    assert len(finished) == 1
    return texts, finished[0]


def test_the_fitted_prompt_and_its_reply_budget_reach_the_backend():
    backend = StreamBackend()
    texts, stats = run(backend, Fit(reply=7, context=300))
    assert backend.prompts == ["prompt without 0 turns"] and backend.params[0].max_new_tokens == 7
    assert texts[-1] == "Hello world" and all(texts[-1].startswith(text) for text in texts)
    assert (stats.prompt_tokens, stats.context_length, stats.generated_tokens) == (10, 300, 2)
    assert stats.finish_reason == FINISH_STOP and stats.time_to_first_token_s is not None


def test_a_stop_sequence_ends_the_reply_before_it_and_the_stream_is_closed():
    backend = StreamBackend(["Paris", " is", "\nUser:", " and more"])
    texts, stats = run(backend)
    assert texts[-1] == "Paris is" and "User:" not in "".join(texts)
    assert stats.finish_reason == FINISH_STOP and backend.closed == 1


def test_the_backends_finish_reason_is_reported():
    _, stats = run(StreamBackend(finish=FINISH_LENGTH))
    assert stats.finish_reason == FINISH_LENGTH


def test_a_seed_is_chosen_before_the_stream_and_reported():
    backend = StreamBackend()
    _, stats = run(backend)
    assert stats.seed is not None and backend.params[0].seed == stats.seed


def test_a_server_length_error_fits_again_with_one_more_turn_dropped_and_says_so():
    backend = StreamBackend(overflows=2)
    fit = Fit(turns=5)
    texts, stats = run(backend, fit, droppable_turns=5)
    assert fit.asked == [0, 1, 2] and backend.closed == 3
    assert strip_note(texts[-1]) == "Hello world" and stats.dropped_turns == 2
    assert note_of(texts[-1]) == (
        "The model did not see the 2 earliest turns: with them the conversation would not fit its "
        "context of 100 tokens."
    )


def test_after_a_few_length_errors_turns_go_two_four_eight_at_a_time():
    fit = Fit()
    run(StreamBackend(overflows=LINEAR_RETRIES + 3), fit, droppable_turns=1000)
    assert fit.asked == [
        *range(LINEAR_RETRIES + 1),
        LINEAR_RETRIES + 2,
        LINEAR_RETRIES + 6,
        LINEAR_RETRIES + 14,
    ]


def test_a_length_error_with_no_turn_left_is_told_in_one_sentence():
    texts, stats = run(StreamBackend(overflows=1), Fit(), droppable_turns=0)
    assert texts == [NOTE_MARK + ContextOverflow.user_message]
    assert stats.error_kind == "ContextOverflow" and stats.finish_reason == "error"


def test_a_failure_keeps_the_partial_reply_with_a_note_and_closes_the_stream():
    backend = StreamBackend(["Partial", " reply"], then=BackendUnavailable(detail="connection reset"))
    texts, stats = run(backend)
    assert strip_note(texts[-1]) == "Partial reply"
    assert note_of(texts[-1]) == f"Reply cut short: {BackendUnavailable.user_message}"
    assert stats.error_kind == "BackendUnavailable" and stats.error_detail == "connection reset"
    assert backend.closed == 1


def test_a_failure_after_turns_were_dropped_says_both_in_one_note():
    backend = StreamBackend(["Partial"], then=BackendUnavailable())
    texts, _ = run(backend, Fit(dropped=1))
    assert note_of(texts[-1]) == (
        f"Reply cut short: {BackendUnavailable.user_message} The model did not see the earliest turn: "
        "with them the conversation would not fit its context of 100 tokens."
    )


def test_an_empty_reply_says_so():
    texts, stats = run(StreamBackend([]))
    assert texts == [NOTE_MARK + EMPTY_REPLY_NOTE] and stats.generated_tokens == 0


def test_cancelled_ends_the_reply_within_a_token_and_closes_the_stream():
    backend = StreamBackend([f" word{i}" for i in range(50)])
    seen = []
    texts, stats = run(backend, cancelled=lambda: len(seen) > 0 or seen.append(1) or False)
    assert stats.finish_reason == FINISH_CANCELLED and stats.generated_tokens == 2
    assert backend.closed == 1 and not any(NOTE_MARK in text for text in texts)


def test_closing_the_generator_closes_the_backends_stream_and_still_reports():
    backend = StreamBackend([f" word{i}" for i in range(50)])
    finished = []
    replies = stream_fitted(backend, Fit(), GenerationParams(), on_finish=finished.append)
    next(replies)
    replies.close()  # what Gradio's Stop does to the handler
    assert backend.closed == 1
    assert len(finished) == 1 and finished[0].finish_reason == FINISH_CANCELLED


@pytest.mark.parametrize("keep", [True, False])
def test_a_completion_keeps_its_leading_space_and_a_chat_reply_does_not(keep):
    texts, _ = run(StreamBackend([" the", " sea"]), keep_leading_space=keep)
    assert texts[-1] == (" the sea" if keep else "the sea")
