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


def test_the_chat_completion_and_export_events_skip_gradio_preprocessing():
    demo = build_demo(Quiet(), Settings())
    events = events_by_api_name(demo)
    assert events["chat"].preprocess is False
    assert events["complete"].preprocess is False
    page_replies = [fn for fn in demo.fns.values() if fn.name in ("reply", "option_reply")]
    assert len(page_replies) == 4  # Send, Retry, Edit, and the buttons under a reply
    assert all(fn.preprocess is False for fn in page_replies)
    assert events["export"].preprocess is False  # reads the page's messages itself


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


def test_the_page_keeps_no_conversation_in_gradios_browser_state():
    """Gradio's BrowserState keys what it keeps with a secret made at each start (a restart lost
    every saved chat) and reads storage unguarded (a frame denied storage hung on "Loading...");
    the chats and settings are kept by the page's own script instead (assets/chats.js)."""
    demo = build_demo(Quiet(), Settings())
    assert not [block for block in demo.blocks.values() if isinstance(block, gr.BrowserState)]
    assert not [block for block in demo.blocks.values() if isinstance(block, gr.ChatInterface)]


def test_reading_gradios_queue_stops_the_start_if_it_has_moved():
    import types

    import pytest

    from chat.web.gradio_patches.queue import queue_size

    with pytest.raises(
        RuntimeError, match=f"Gradio {gr.__version__} has no .*_queue.*checked with Gradio 6.31.0"
    ):
        queue_size(types.SimpleNamespace())
    demo = build_demo(Quiet(), Settings())
    assert queue_size(demo)() == 0  # a queue with nothing waiting (tests/test_load.py sees one wait)


def test_gradios_plot_backend_switch_around_each_event_searches_no_path(monkeypatch):
    """Gradio switches matplotlib's backend around every step of every event; where matplotlib is
    not installed, each switch searched sys.path for it (twice per streamed token)."""
    import importlib.machinery
    import importlib.util
    import sys

    import gradio.utils
    import pytest

    if sys.modules.get("matplotlib") is not None or (
        "matplotlib" not in sys.modules and importlib.util.find_spec("matplotlib") is not None
    ):
        pytest.skip("matplotlib is installed here: its import finds it")
    searched = []
    real = importlib.machinery.PathFinder.find_spec

    def find_spec(cls, name, path=None, target=None):
        searched.append(name)
        return real(name, path, target)

    monkeypatch.setattr(importlib.machinery.PathFinder, "find_spec", classmethod(find_spec))
    monkeypatch.delitem(sys.modules, "matplotlib", raising=False)
    with gradio.utils.MatplotlibBackendMananger():  # what an event's step runs in
        pass
    assert searched.count("matplotlib") == 2  # without the workaround: enter and exit each search

    build_demo(Quiet(), Settings())  # which looks for it once
    searched.clear()
    with gradio.utils.MatplotlibBackendMananger():
        pass
    assert "matplotlib" not in searched
