"""Generation parameters are validated on the server, with messages that name the parameter."""

from __future__ import annotations

import math

import pytest

from chat.conversation.errors import InvalidParameter
from chat.conversation.params import DEFAULT_STOP_SEQUENCES, GenerationParams


def test_defaults_are_the_seed_documents_values_but_a_reply_long_enough_for_ordinary_answers():
    params = GenerationParams()
    assert (params.temperature, params.top_p, params.repetition_penalty) == (0.6, 0.9, 1.0)
    # Not the seed's 256, which cut ordinary essays: the cap reserves nothing now (fitting.py).
    assert params.max_new_tokens == 1024
    assert params.stop_sequences == DEFAULT_STOP_SEQUENCES


def test_default_stops_end_every_turn_the_model_invents():
    # The model writing its own next turn ("\nFalcon:") is as much the end of a reply as "\nUser:".
    assert {"\nUser:", "\nFalcon:", "\nSystem:", "<|endoftext|>"} == set(DEFAULT_STOP_SEQUENCES)


def test_temperature_zero_is_greedy_not_an_error():
    assert GenerationParams(temperature=0).greedy


def test_missing_values_take_defaults_and_sliders_floats_become_integers():
    params = GenerationParams.from_request(None, temperature=None, max_new_tokens=128.0, top_p=1.0)
    assert params.temperature == 0.6 and params.max_new_tokens == 128 and params.top_p == 1.0


@pytest.mark.parametrize(
    "name, value",
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "hot"),
        ("top_p", 0),
        ("top_p", 1.5),
        ("max_new_tokens", 0),
        ("max_new_tokens", 10.5),
        ("max_new_tokens", 10**9),
        ("max_new_tokens", True),
        ("repetition_penalty", 0.9),
        ("repetition_penalty", 2.5),
        ("top_k", -1),
        ("seed", -3),
        ("stop_sequences", "###"),
        ("stop_sequences", [""]),
    ],
)
def test_out_of_range_or_wrong_type_names_the_parameter(name, value):
    with pytest.raises(InvalidParameter) as raised:
        GenerationParams.from_request(None, **{name: value})
    assert name in raised.value.user_message


def test_unknown_parameter_is_refused():
    with pytest.raises(InvalidParameter, match="banana"):
        GenerationParams.from_request(None, banana=1)
