"""The streaming stop filter, over every way a stream can be split into tokens."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from chat.conversation.params import DEFAULT_STOP_SEQUENCES
from chat.conversation.stops import StopFilter
from tests.helpers import filter_stream


def expected_final(text: str, stops) -> str:
    ends = [i for s in stops if (i := text.find(s)) >= 0]
    return (text[: min(ends)] if ends else text).replace("\ufffd", "").strip()


def splits(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:], strict=False)]


alphabet = st.sampled_from(list("ab \nUserSystm:<|>endoftx") + ["\ufffd", "é", "😀"])
texts = st.lists(alphabet, max_size=60).map("".join)
stop_sets = st.one_of(
    st.just(DEFAULT_STOP_SEQUENCES),
    st.lists(st.text(alphabet=list("ab\nU:s"), min_size=1, max_size=4), min_size=1, max_size=3),
)


@given(texts, st.lists(st.integers(min_value=0), max_size=20), stop_sets)
def test_every_shown_text_is_a_prefix_of_the_final_text(text, cuts, stops):
    shown = list(filter_stream(splits(text, cuts), stops))
    final = expected_final(text, stops)
    assert (shown[-1] if shown else "") == final
    for earlier in shown:
        assert final.startswith(earlier)
    assert all(a != b for a, b in zip(shown, shown[1:], strict=False))


@given(texts, st.lists(st.integers(min_value=0), max_size=20), stop_sets)
def test_no_shown_text_contains_a_stop_sequence_or_replacement_character(text, cuts, stops):
    for shown in filter_stream(splits(text, cuts), stops):
        assert not any(stop in shown for stop in stops)
        assert "\ufffd" not in shown
        assert shown == shown.strip()


def test_stop_sequence_prefix_is_never_shown():
    stop_filter = StopFilter(["\nUser:"])
    stop_filter.push("Sure, here it is.")
    stop_filter.push("\nUs")
    assert stop_filter.text == "Sure, here it is."
    stop_filter.push("er: next question")
    assert stop_filter.stopped and stop_filter.text == "Sure, here it is."


def test_held_back_text_is_released_when_it_turns_out_not_to_be_a_stop():
    stop_filter = StopFilter(["\nUser:"])
    stop_filter.push("Dear")
    stop_filter.push("\nUse")
    assert stop_filter.text == "Dear"
    stop_filter.push("ful things")
    assert stop_filter.text == "Dear\nUseful things"


def test_filter_stops_reading_the_stream_at_the_first_stop():
    consumed = []

    def tokens():
        for piece in ["Hello", " world", "\nUser:", " more", " text"]:
            consumed.append(piece)
            yield piece

    assert list(filter_stream(tokens(), DEFAULT_STOP_SEQUENCES)) == ["Hello", "Hello world"]
    assert consumed == ["Hello", " world", "\nUser:"]


def test_normal_answers_with_headings_and_dear_user_are_not_cut():
    text = "### Steps\nDear User: here is the plan."
    assert list(filter_stream([text], DEFAULT_STOP_SEQUENCES))[-1] == text


def test_split_utf8_replacement_characters_are_never_shown():
    # What a per-token decoder writes for the two halves of an emoji split across tokens.
    assert list(filter_stream(["ok ", "\ufffd", "\ufffd", " done"], []))[-1] == "ok  done"
