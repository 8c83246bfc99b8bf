"""chat.gradio_costs: the workarounds are in place on a built page, and change nothing else."""

from __future__ import annotations

import inspect

import gradio as gr
import gradio.blocks

from chat.backends.base import Backend, Token
from chat.config import Settings
from chat.ui import build_demo


class Quiet(Backend):
    """Builds the page; never asked to generate here."""

    def context_length(self) -> int:
        return 2048

    def count_tokens(self, text: str) -> int:
        return len(text)

    def stream(self, prompt, params):
        yield Token("", finish_reason="stop")


def events_by_api_name(demo: gr.Blocks) -> dict:
    return {block_fn.api_name: block_fn for block_fn in demo.fns.values()}


def test_the_chat_and_completion_events_skip_gradio_preprocessing_and_the_others_keep_it():
    events = events_by_api_name(build_demo(Quiet(), Settings()))
    assert events["chat"].preprocess is False
    assert events["complete"].preprocess is False
    ui_submits = [fn for fn in events.values() if fn.name == "_submit_fn"]
    assert ui_submits and all(fn.preprocess is False for fn in ui_submits)
    assert events["export"].preprocess is True  # takes the chatbot, which needs Gradio's conversion


def test_the_wrapped_chat_event_keeps_its_streaming_and_its_documented_signature():
    chat_fn = events_by_api_name(build_demo(Quiet(), Settings()))["chat"].fn
    assert inspect.isasyncgenfunction(chat_fn)
    assert list(inspect.signature(chat_fn).parameters)[:2] == ["message", "history"]  # the API page's


def test_gradio_blocks_sees_cached_signatures_equal_to_inspects():
    build_demo(Quiet(), Settings())
    cached = gradio.blocks.inspect
    assert cached.signature(gr.Textbox.__init__) == inspect.signature(gr.Textbox.__init__)
    assert cached.signature(gr.Textbox.__init__) is cached.signature(gr.Textbox.__init__)
    assert cached.isasyncgenfunction is inspect.isasyncgenfunction  # the rest is inspect itself


def test_the_queue_summarises_rarely_unless_the_operator_says_otherwise(monkeypatch):
    queue = build_demo(Quiet(), Settings())._queue
    assert (queue.ANAYLTICS_CACHE_FREQUENCY, queue.ANALYTICS_MAX_EVENTS) == (500, 2_000)
    monkeypatch.setenv("GRADIO_ANALYTICS_CACHE_FREQUENCY", "7")
    monkeypatch.setenv("GRADIO_ANALYTICS_MAX_EVENTS", "70")
    queue = build_demo(Quiet(), Settings())._queue
    assert (queue.ANAYLTICS_CACHE_FREQUENCY, queue.ANALYTICS_MAX_EVENTS) == (7, 70)
