"""A blocking iterator of growing snapshots, run in its own thread, read from asyncio.

Gradio runs a synchronous generator by sending every `next()` to a worker thread and awaiting it:
per streamed update, one hand-off from the event loop to a thread and back. With many streams at
once that traffic, not the work, is what the event loop spends its time on (docs/reliability.md).
`newest_in_thread` turns it around: the blocking iteration (HTTP reads, the model, the stop
filter) runs in one thread per reply, and the event loop only hears of it when it is ready for the
next update: it is then given the newest item, and the items it was too busy to show are skipped.
That is lossless for snapshots of a growing text (each contains the ones before it), and it means
a busy server shows fewer, larger updates instead of falling behind.

The last item and any exception always arrive. Closing the async iterator (Stop, a closed tab, a
cancelled API call) sets `cancelled`, which the producer checks after every token it reads, and
the thread then closes the blocking iterator itself: a generator can only be closed by the thread
that runs it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

from chat.conversation.cancellation import Cancellation

T = TypeVar("T")

_NOTHING = object()


class UpdatePacer:
    """Shares a budget of page updates per second among the replies streaming at the moment.

    Each update costs the event loop the same (Gradio's processing of the output, its diff, the
    event to the page), whatever it carries, and the loop is also what answers new requests. So
    with many replies streaming, each shows its text less often, in larger pieces, and the loop
    keeps time for the next user's first token. Used on the event loop only.
    """

    def __init__(self, updates_per_s: float, min_interval_s: float = 0.0):
        self.updates_per_s = updates_per_s
        self.min_interval_s = min_interval_s
        self.streaming = 0

    def interval_s(self) -> float:
        """The least time between two updates of one reply, now."""
        return max(self.min_interval_s, self.streaming / self.updates_per_s)


class _Newest:
    """The slot the producer thread writes and the event loop reads."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.item = _NOTHING
        self.done = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future | None = None
        self.wake_on_put = True  # False while the reader waits out its pacing interval

    def put(self, item) -> None:
        with self.lock:
            self.item = item
            waiter = self.waiter if self.wake_on_put else None
            if waiter is not None:
                self.waiter = None
        self._wake(waiter)

    def finish(self, error: BaseException | None) -> None:
        with self.lock:
            self.done, self.error = True, error
            waiter, self.waiter = self.waiter, None
        self._wake(waiter)

    def _wake(self, waiter: asyncio.Future | None) -> None:
        if waiter is not None:  # only when the loop is waiting: one wake-up per update, not per token
            try:
                self.loop.call_soon_threadsafe(_resolve, waiter)
            except RuntimeError:  # the loop has closed (shutdown): nobody is waiting any more
                pass


def _resolve(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


ABANDONED_CHECK_S = 0.5  # while no item comes, how often `abandoned` is asked


async def newest_in_thread(
    make: Callable[[threading.Event], Iterator[T]],
    *,
    pacer: UpdatePacer | None = None,
    name: str = "reply",
    abandoned: Callable[[], bool] | None = None,
) -> AsyncIterator[T]:
    """Yield the newest item of `make(cancelled)`, iterated in a thread of its own.

    `make` is called in that thread; the iterator it returns should check `cancelled.is_set()`
    whenever it can (after every token) and end soon after it is set. With a `pacer`, two items
    are at least its interval apart, except the first and the last, which are never held back.
    While no item comes, `abandoned()` is asked every ABANDONED_CHECK_S: when it says the
    consumer has gone (Gradio notices a closed page only when it next has an update to send,
    which a server that has not sent its first token never gives it), this ends, cancelling.
    """
    loop = asyncio.get_running_loop()
    slot = _Newest(loop)
    cancelled = Cancellation()  # a threading.Event whose set() also interrupts blocked reads

    def produce() -> None:
        error = None
        try:
            items = make(cancelled)
            try:
                for item in items:
                    slot.put(item)
                    if cancelled.is_set():
                        break
            finally:
                close = getattr(items, "close", None)
                if close is not None:
                    close()  # runs the producer's own finally: the backend stops generating
        except BaseException as exc:  # handed to the event loop, raised there
            error = exc
        finally:
            slot.finish(error)

    threading.Thread(target=produce, name=name, daemon=True).start()
    if pacer is not None:
        pacer.streaming += 1
    try:
        due = 0.0  # when the next item may be shown
        while True:
            with slot.lock:
                item, slot.item = slot.item, _NOTHING
                done, error = slot.done, slot.error
                waiter = None
                if item is _NOTHING and not done:
                    waiter = slot.waiter = loop.create_future()
                    slot.wake_on_put = True
            if item is not _NOTHING:
                if not done and loop.time() < due:
                    await _hold(slot, item, due, loop)
                    continue  # the newest item by now, or the end
                yield item
                due = loop.time() + pacer.interval_s() if pacer is not None else 0.0
            elif done:
                if error is not None:
                    raise error
                return
            elif abandoned is None:
                await waiter
            else:
                await asyncio.wait({waiter}, timeout=ABANDONED_CHECK_S)
                if not waiter.done() and abandoned():
                    return
    finally:
        cancelled.set()
        if pacer is not None:
            pacer.streaming -= 1


async def _hold(slot: _Newest, item, due: float, loop: asyncio.AbstractEventLoop) -> None:
    """Put `item` back and wait until `due`, or until the producer has finished."""
    with slot.lock:
        if slot.item is _NOTHING:
            slot.item = item
        waiter = slot.waiter = loop.create_future()
        slot.wake_on_put = False
        if slot.done:
            _resolve(waiter)
    timer = loop.call_at(due, _resolve, waiter)
    try:
        await waiter
    finally:
        timer.cancel()
        with slot.lock:
            slot.wake_on_put = True
            if slot.waiter is waiter:
                slot.waiter = None
