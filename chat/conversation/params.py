"""Generation parameters: one frozen dataclass, validated where it is built.

The `/chat` API can be called without the page's sliders (and Gradio's REST route accepts NaN and
infinity), so every value is checked here, on the server, with a message that names the parameter.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from chat.conversation.errors import InvalidParameter

# End of a Falcon turn: the next turn's marker, whoever the model makes speak next (itself
# included), or the end-of-text token. The seed demo's "###" and " User:" also cut normal answers
# (markdown headings, "Dear User:"), so they are only used when configured.
DEFAULT_STOP_SEQUENCES = ("\nUser:", "\nFalcon:", "\nSystem:", "<|endoftext|>")

DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.9
# Room for an ordinary answer (a few paragraphs, a recipe, a short essay: 300-800 tokens) to end on
# its own. It reserves nothing: the conversation is fitted first and the reply gets what is left
# (chat/conversation/fitting.py), so a higher cap never costs a turn.
DEFAULT_MAX_NEW_TOKENS = 1024
DEFAULT_REPETITION_PENALTY = 1.0

MAX_TEMPERATURE = 2.0
MAX_NEW_TOKENS = 8192
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1.0, 2.0
MAX_TOP_K = 1000
MAX_SEED = 2**63 - 1
MAX_STOP_SEQUENCES = 8
MAX_STOP_SEQUENCE_CHARS = 64


@dataclass(frozen=True)
class GenerationParams:
    """How to sample one reply. temperature 0 means greedy; top_p 1.0 and top_k 0 mean off."""

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY
    top_k: int = 0
    seed: int | None = None
    stop_sequences: tuple[str, ...] = DEFAULT_STOP_SEQUENCES

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("temperature", _number("temperature", self.temperature, 0.0, MAX_TEMPERATURE))
        set_("top_p", _number("top_p", self.top_p, 0.0, 1.0, low_open=True))
        set_("max_new_tokens", _integer("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS))
        set_(
            "repetition_penalty",
            _number(
                "repetition_penalty",
                self.repetition_penalty,
                MIN_REPETITION_PENALTY,
                MAX_REPETITION_PENALTY,
            ),
        )
        set_("top_k", _integer("top_k", self.top_k, 0, MAX_TOP_K))
        if self.seed is not None:
            set_("seed", _integer("seed", self.seed, 0, MAX_SEED))
        set_("stop_sequences", _stop_sequences(self.stop_sequences))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def with_max_new_tokens(self, max_new_tokens: int) -> GenerationParams:
        return dataclasses.replace(self, max_new_tokens=max_new_tokens)

    @classmethod
    def from_request(cls, defaults: GenerationParams | None = None, **values) -> GenerationParams:
        """Build from API/UI values; a missing or None value takes the default."""
        base = defaults or cls()
        given = {name: value for name, value in values.items() if value is not None}
        unknown = set(given) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InvalidParameter(f"Unknown generation parameter: {', '.join(sorted(unknown))}.")
        return dataclasses.replace(base, **given)


def _number(name: str, value, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameter(f"{name} must be a number, not {_shown(value)}.")
    value = float(value)
    too_low = value <= low if low_open else value < low
    if not math.isfinite(value) or too_low or value > high:
        bound = f"greater than {low:g}" if low_open else f"at least {low:g}"
        raise InvalidParameter(f"{name} must be {bound} and at most {high:g} (got {_shown(value)}).")
    return value


def _integer(name: str, value, low: int, high: int) -> int:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)  # sliders send 256.0
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameter(f"{name} must be a whole number, not {_shown(value)}.")
    if not low <= value <= high:
        raise InvalidParameter(f"{name} must be between {low} and {high} (got {value}).")
    return value


def _stop_sequences(value) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise InvalidParameter("stop_sequences must be a list of strings.")
    if len(value) > MAX_STOP_SEQUENCES:
        raise InvalidParameter(f"stop_sequences: at most {MAX_STOP_SEQUENCES} are allowed.")
    for stop in value:
        if not isinstance(stop, str) or not stop or len(stop) > MAX_STOP_SEQUENCE_CHARS:
            raise InvalidParameter(
                f"stop_sequences: each must be a string of 1 to {MAX_STOP_SEQUENCE_CHARS} characters."
            )
    return tuple(value)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
