"""One reply through `chat.conversation.reply` with a scripted backend: what the stats and the text say."""

from __future__ import annotations

from chat.conversation.errors import ContextOverflow
from chat.conversation.params import GenerationParams
from chat.conversation.reply import LINEAR_RETRIES, stream_completion
from tests.doubles import ScriptedBackend
from tests.helpers import reply_with_stats


def test_the_seed_is_reported_when_a_stop_sequence_ends_thereply_with_stats():
    # The stop sequence arrives before the backend's last event (which carries its seed).
    backend = ScriptedBackend(["Paris.", "\nUser:", " more"], seed_reported=None)
    texts, stats = reply_with_stats(backend)
    assert texts[-1] == "Paris." and stats.finish_reason == "stop"
    assert stats.seed is not None and backend.params[0].seed == stats.seed


def test_a_chosen_seed_is_the_one_sent_and_reported():
    backend = ScriptedBackend(["Hi"])
    _, stats = reply_with_stats(backend, params=GenerationParams(seed=7))
    assert stats.seed == 7 == backend.params[0].seed


def test_a_greedy_reply_has_no_seed_even_when_one_is_given():
    """At temperature 0 nothing is drawn: a seed would be a meaningless figure."""
    for seed in (None, 7):
        backend = ScriptedBackend(["Hi"])
        _, stats = reply_with_stats(backend, params=GenerationParams(temperature=0.0, seed=seed))
        assert stats.seed is None and backend.params[0].seed is None


def test_a_completion_keeps_the_leading_space_of_its_continuation():
    backend = ScriptedBackend([" the", " two", " primary"])
    texts = list(stream_completion(backend, "Name", GenerationParams(), max_message_chars=100))
    assert texts[-1] == " the two primary"


class OverflowingBackend(ScriptedBackend):
    """A server whose input limit is far below the context it reports: every prompt is too long."""

    def stream(self, prompt, params):
        self.prompts.append(prompt)
        raise ContextOverflow(detail="inputs must have less than 10 tokens")
        yield


def test_server_length_errors_cost_a_bounded_number_of_retries():
    backend = OverflowingBackend()
    history = [{"role": r, "content": f"{r} {i}"} for i in range(200) for r in ("user", "assistant")]
    texts, stats = reply_with_stats(backend, history=history)
    assert stats.error_kind == "ContextOverflow" and stats.dropped_turns == 200
    assert len(backend.prompts) <= 1 + LINEAR_RETRIES + 8  # then 2, 4, ... 128 turns at a time
