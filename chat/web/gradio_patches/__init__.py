"""Every reach of this app into Gradio's private names, and nothing else: `costs` (what Gradio costs
per request or update, and the two workarounds hostile input needs), `queue` (what the app reads
from Gradio's queue) and `tracebacks` (Gradio's printed tracebacks, logged). Each was checked against Gradio 6.31.0, the version requirements.txt pins;
each checks at start-up, with `require`, that what it touches is still there, and stops the start
naming the Gradio version if not: a silent no-op would bring back unseen what it was for. Each
says what it waits for; each has a test of its effect:

- costs.cache_config_signatures, summarise_queue_rarely (Gradio's own environment settings),
  no_matplotlib_lookups (sys.modules only): tests/test_gradio_costs.py;
- costs.check_value_counts, forget_input_values: tests/test_hostile.py;
- queue.event_watch: tests/test_faults.py (a client gone before the first token);
- queue.queue_size: tests/test_load.py (the depth metric counts a waiting request);
- tracebacks.log_gradio_tracebacks: tests/test_app_process.py (a bad preset value, logged once).

The chat itself needs none: chat/web/chat_events.py wires it through public arguments only, and
the Chatbot's sanitizer settings are its constructor's (chat/web/security.py). No module outside
this package names Gradio's internal modules (tests/test_architecture.py).
"""

from __future__ import annotations

import gradio as gr

CHECKED_WITH = "6.31.0"  # the Gradio release each patch here was read against


def require(holder, attribute: str, why: str) -> None:
    """Stop the start if Gradio's `holder` no longer has `attribute` (the patch needs it to `why`)."""
    if not hasattr(holder, attribute):
        raise RuntimeError(
            f"Gradio {gr.__version__} has no {getattr(holder, '__name__', type(holder).__name__)}."
            f"{attribute}, which chat/web/gradio_patches (checked with Gradio {CHECKED_WITH}) relies on "
            f"to {why}; update the workaround."
        )
