"""chat.conversation.cancellation: a cancellation that also runs the interrupts registered with it."""

from __future__ import annotations

from chat.conversation.cancellation import Cancellation


def test_setting_runs_each_interrupt_once_and_late_ones_at_once():
    cancelled, calls = Cancellation(), []
    cancelled.on_set(lambda: calls.append("a"))
    forget = cancelled.on_set(lambda: calls.append("forgotten"))
    forget()
    assert not cancelled()
    cancelled.set()
    cancelled.set()
    assert cancelled() and calls == ["a"]
    cancelled.on_set(lambda: calls.append("late"))
    assert calls == ["a", "late"]


def test_a_failing_interrupt_does_not_stop_the_others():
    cancelled, calls = Cancellation(), []
    cancelled.on_set(lambda: 1 / 0)
    cancelled.on_set(lambda: calls.append("b"))
    cancelled.set()
    assert calls == ["b"] and cancelled.is_set()
