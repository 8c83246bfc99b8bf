"""Costs Gradio 6 puts on every request or streamed update, and what this app does about each.

Each was found with `py-spy record --gil` against `bench/load.py` and is measured in
docs/reliability.md. They are workarounds for the framework's habits, kept in one place so that
each can be dropped when Gradio stops needing it; each says what it waits for. Public settings
are used where Gradio has them; where a workaround must reach inside Gradio, `require` checks at
start-up that what it touches is still there (checked against Gradio 6.31.0: see the package's
docstring). tests/test_gradio_costs.py checks each one's effect through Gradio's own code.

Here too: the two workarounds that hostile input needs (chat/web/security.py applies them): Gradio
keeping every session's input values, and API calls with the wrong number of values
(tests/test_hostile.py checks their effect).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import sys
import types

import gradio as gr

from chat.web.gradio_patches import require

# Gradio reads these when `demo.queue()` builds its queue (gradio-app/gradio#11764, which added
# the summary; 6.31 still recomputes it after every event by default).
QUEUE_ANALYTICS_DEFAULTS = {"GRADIO_ANALYTICS_CACHE_FREQUENCY": "500", "GRADIO_ANALYTICS_MAX_EVENTS": "2000"}


def trim_gradio_costs(demo: gr.Blocks) -> None:
    """Apply every workaround below to `demo`; call it before `demo.queue()`. (Gradio's
    preprocessing, which costs eight hand-offs from the event loop per chat request, is turned off
    where the events are made, through the public `preprocess=False`: every value is checked by
    our own code, with messages that name the setting.)"""
    summarise_queue_rarely()
    no_matplotlib_lookups()
    cache_config_signatures()


def check_value_counts(demo: gr.Blocks) -> None:
    """An API call with fewer values than the endpoint takes fails inside Gradio with a ValueError
    the client only sees as `{"error": null}`; more values are silently dropped. Refuse both with
    a message that says how many values the endpoint takes, in which order (Gradio 6.31,
    `Blocks.validate_inputs`, called before anything of the event runs)."""
    require(demo, "validate_inputs", "name the values an API endpoint takes")
    gradio_check = demo.validate_inputs

    def validate_inputs(block_fn, inputs):
        # More values than inputs are refused only for public API endpoints without a `js=`
        # step (Gradio lets a page's JavaScript return extra values).
        strict = block_fn.api_visibility == "public" and not block_fn.js
        if len(inputs) < len(block_fn.inputs) or (strict and len(inputs) > len(block_fn.inputs)):
            sent = [block for block in block_fn.inputs if not block.stateful]
            names = ", ".join(block.label or type(block).__name__ for block in sent) or "none"
            raise gr.Error(
                f"/{block_fn.api_name} takes {len(sent)} values, in this order: {names}.",
                print_exception=False,
            )
        return gradio_check(block_fn, inputs)

    demo.validate_inputs = validate_inputs


def forget_input_values() -> None:
    """Gradio keeps the last value of every input of every session (up to 10,000 sessions), for
    its deep links, so any value a client sends stays in memory, refused or not. This app has no
    deep links (their route is closed): keep none. (Gradio 6.31, gradio/state_holder.py)"""
    from gradio.state_holder import SessionState

    if getattr(SessionState._update_value_in_config, "forgets", False):
        return
    require(SessionState, "_update_value_in_config", "keep no session's input values")

    def _update_value_in_config(self, key, value):
        return None

    _update_value_in_config.forgets = True
    SessionState._update_value_in_config = _update_value_in_config


def summarise_queue_rarely() -> None:
    """Gradio's queue recomputes its per-function timing summary (a pandas group-by over the last
    10,000 events, for the API page's figures) after every event, in a worker thread: a cost that
    grows with the app's age, paid by every request. Through Gradio's own environment settings,
    recompute it every 500 events, over the last 2,000; an operator's values are kept. Waits for
    a Gradio whose default is not every event."""
    for name, value in QUEUE_ANALYTICS_DEFAULTS.items():
        os.environ.setdefault(name, value)


def no_matplotlib_lookups() -> None:
    """Gradio imports matplotlib around every step of every event (to switch its plot backend).
    Where it is not installed, each failed import searches sys.path again: twice per streamed
    token, on the event loop. A None in sys.modules makes that import fail at once; this app
    draws no plots. Waits for Gradio to import matplotlib only for events that plot."""
    if "matplotlib" not in sys.modules and importlib.util.find_spec("matplotlib") is None:
        sys.modules["matplotlib"] = None


def cache_config_signatures() -> None:
    """Gradio builds a component's configuration from `inspect.signature(cls.__init__)`, computed
    afresh each time: for every component on the page when a new session starts (57 here) and
    for the chat's state after every streamed update. The signature of a class's `__init__`
    never changes, so `gradio.blocks` is given an `inspect` whose `signature` is cached (a new
    session: 8.7 -> 3.3 ms, docs/reliability.md). Waits for Gradio to cache it itself."""
    import gradio.blocks

    require(gradio.blocks, "inspect", "cache component signatures")
    if not isinstance(gradio.blocks.inspect, InspectWith):
        gradio.blocks.inspect = InspectWith(signature=functools.lru_cache(maxsize=1024)(inspect.signature))


class InspectWith(types.ModuleType):
    """The `inspect` module for one of Gradio's modules, with some of its functions replaced."""

    def __init__(self, **replaced):
        super().__init__("inspect")
        vars(self).update(replaced)

    def __getattr__(self, name):  # only asked for what is not replaced
        return getattr(inspect, name)
