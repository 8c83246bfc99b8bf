"""A reply's cancellation, that can also interrupt a read blocked in its thread.

The reply's thread checks for cancellation after every token, but while it waits for the next
one (a slow or busy server, the wait for the first token) it sits in a blocking read: a client
that went away kept the server generating until the next token came, seconds later. So whoever
cancels (`set()`) also runs the callbacks registered with `on_set`, from its own thread: a
remote backend registers one that shuts the connection down, which ends the read at once.

The reply's code passes the cancellation down the chain implicitly, through `current` (a context
variable of the reply's thread), so the backend protocol stays `stream(prompt, params)`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextvars import ContextVar

current: ContextVar[Cancellation | None] = ContextVar("falcon_chat_cancellation", default=None)


class Cancellation(threading.Event):
    """A `threading.Event` that runs callbacks when set; calling it tells whether it is set."""

    def __init__(self):
        super().__init__()
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def __call__(self) -> bool:
        return self.is_set()

    def on_set(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Run `callback` when this is set (at once if it already is); returns how to forget it."""
        with self._lock:
            already = self.is_set()
            if not already:
                self._callbacks.append(callback)
        if already:
            callback()

        def forget() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return forget

    def set(self) -> None:
        with self._lock:
            if self.is_set():
                return
            super().set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                pass
