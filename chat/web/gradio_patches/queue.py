"""What the app reads from Gradio's queue, which has no public way to ask it: whether a running
event's page or API client has gone, and how many requests wait. Checked against Gradio 6.31.0;
`require` checks at start-up that what each reads is there (see the package's docstring).
"""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr

from chat.web.gradio_patches import require


def event_watch(demo: gr.Blocks) -> Callable[[], Callable[[], bool] | None]:
    """For the event of `demo` running now (called in its context): a check of whether Gradio
    has marked it dead, which Gradio 6.31 does when the session's event stream closes (a closed
    page or API client: `Queue.clean_events`) but acts on only when the event next yields, and a
    reply waiting for its first token does not yield. None outside an event. Asked by
    chat.web.bridge while a reply waits. Waits for Gradio to end such events itself."""
    from gradio.context import LocalContext

    require(LocalContext, "event_id", "notice a closed page before a reply's first token")
    require(demo, "_queue", "notice a closed page before a reply's first token")
    require(demo._queue, "active_jobs", "notice a closed page before a reply's first token")

    def watch() -> Callable[[], bool] | None:
        event_id = LocalContext.event_id.get(None)
        if event_id is None:
            return None

        def gone() -> bool:
            return any(  # the queue of now: `demo.queue()` makes a new one
                getattr(event, "_id", None) == event_id and not event.alive
                for job in list(demo._queue.active_jobs)
                if job
                for event in job
            )

        return gone

    return watch


def queue_size(demo: gr.Blocks) -> Callable[[], int]:
    """How many requests wait in `demo`'s queue now (for the `falcon_chat_queue_depth` metric;
    tests/test_load.py sees it count). Gradio 6.31's queue counts them itself (`len`), but the
    queue is reachable only as `demo._queue`, made anew by `demo.queue()`: call this after it.
    Waits for Gradio to report its queue's depth publicly."""
    require(demo, "_queue", "report how many requests wait")
    require(type(demo._queue), "__len__", "report how many requests wait")
    return lambda: len(demo._queue)
