"""chat.web.gradio_patches.costs: the workarounds are in place on a built page, and change nothing else."""

from __future__ import annotations

import inspect

import gradio as gr
import gradio.blocks

from chat.config import Settings
from chat.conversation.backend import Backend, Token
from chat.web.page import build_demo


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


def test_a_new_sessions_config_is_built_from_cached_signatures():
    demo = build_demo(Quiet(), Settings())
    cached = gradio.blocks.inspect
    assert cached.signature(gr.Textbox.__init__) == inspect.signature(gr.Textbox.__init__)
    assert cached.isasyncgenfunction is inspect.isasyncgenfunction  # the rest is inspect itself
    demo.get_config_file()  # what a new session's page load asks for
    before = cached.signature.cache_info()
    demo.get_config_file()
    after = cached.signature.cache_info()
    # Gradio's own config code went through the cache, and computed nothing anew.
    assert after.hits > before.hits and after.misses == before.misses


def test_the_queue_summarises_every_500_events_unless_the_operator_says_otherwise(monkeypatch):
    def computations(queue, events: int) -> int:
        count = 0
        real = queue._get_df

        def counted(records):
            nonlocal count
            count += 1
            return real(records)

        queue._get_df = counted
        records = [{"function": "chat", "status": "success", "process_time": 0.1}]
        for _ in range(events):  # as Gradio's queue does after each finished event
            queue.events_recorded += 1
            queue.compute_analytics_summary(records)
        return count

    for name in ("GRADIO_ANALYTICS_CACHE_FREQUENCY", "GRADIO_ANALYTICS_MAX_EVENTS"):
        monkeypatch.delenv(name, raising=False)
    assert computations(build_demo(Quiet(), Settings())._queue, 1000) == 2  # Gradio's default: 1000
    monkeypatch.setenv("GRADIO_ANALYTICS_CACHE_FREQUENCY", "100")
    assert computations(build_demo(Quiet(), Settings())._queue, 1000) == 10


def test_a_missing_gradio_internal_stops_the_start_naming_the_version(monkeypatch):
    import pytest

    from chat.web.gradio_patches import costs as gradio_costs

    monkeypatch.delattr(gradio.blocks, "inspect")
    with pytest.raises(RuntimeError, match=f"Gradio {gr.__version__} .*inspect"):
        gradio_costs.cache_config_signatures()


def test_every_save_of_the_chats_drops_empty_ones_and_keeps_the_open_chats_place():
    demo = build_demo(Quiet(), Settings())
    saves = [fn.fn for fn in demo.fns.values() if fn.name == "_save_conversation"]
    assert len(saves) >= 5  # after a reply, a retry, an undo, an edit, and a stopped reply
    save = saves[0]
    a, b = [{"role": "user", "content": "A"}], [{"role": "user", "content": "B"}]
    assert save(0, [], [b, a]) == (None, [a])  # B emptied by Undo leaves the list
    assert save(2, a, [[], b, a]) == (1, [b, a])  # an empty one saved earlier goes too
    assert save(None, b, [a]) == (0, [b, a])
    # Two saves end a stopped reply; the second can bring the list from before the first.
    assert save(0, a, []) == (0, [a])
