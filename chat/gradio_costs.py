"""Costs Gradio 6 puts on every request or streamed update, and what this app does about each.

Each was found with `py-spy record --gil` against `bench/load.py` and is measured in
docs/reliability.md. They are workarounds for the framework's habits, kept in one place so that
each can be dropped when Gradio stops needing it; each says what it waits for. Public settings
are used where Gradio has them; where a workaround must reach inside Gradio, `_require` checks at
start-up that what it touches is still there, and stops the start naming the Gradio version if not
(a silent no-op would bring the cost back unseen). tests/test_gradio_costs.py checks each one's
effect through Gradio's own code.

The chat page's workarounds for ChatInterface's behaviour (a locked page after an error, a message
box disabled while a reply streams, a stopped reply that cannot be updated, messages shown with
their indentation taken away, empty saved chats that shift the list) are here too, their
effects checked in a browser (tests/browser/test_page.py); those that must run in the browser
(Enter on an empty box or during a reply, a button Gradio leaves unnamed, what "Copy message" and
"Copy conversation" copy) are in assets/page.js.
So are the two that hostile input needs (chat/security.py applies them): Gradio keeping every
session's input values, and API calls with the wrong number of values.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import sys
import types
from collections.abc import Callable

import gradio as gr
from gradio.events import Dependency

from .reply import MESSAGE_NOT_TEXT

# Gradio reads these when `demo.queue()` builds its queue (gradio-app/gradio#11764, which added
# the summary; 6.31 still recomputes it after every event by default).
QUEUE_ANALYTICS_DEFAULTS = {"GRADIO_ANALYTICS_CACHE_FREQUENCY": "500", "GRADIO_ANALYTICS_MAX_EVENTS": "2000"}


def trim_gradio_costs(demo: gr.Blocks, *, raw_inputs: list) -> None:
    """Apply every workaround below to `demo`; call it before `demo.queue()`."""
    pass_inputs_through(demo, raw_inputs)
    summarise_queue_rarely()
    no_matplotlib_lookups()
    cache_config_signatures()


def _require(holder, attribute: str, why: str) -> None:
    if not hasattr(holder, attribute):
        raise RuntimeError(
            f"Gradio {gr.__version__} has no {getattr(holder, '__name__', type(holder).__name__)}."
            f"{attribute}, which chat/gradio_costs.py relies on to {why}; update the workaround."
        )


def pass_inputs_through(demo: gr.Blocks, raw_inputs: list) -> None:
    """Turn Gradio's preprocessing off for the events that take only `raw_inputs` and state, and
    for `/chat`: their functions get the values as sent. They check every value themselves
    (`GenerationParams`, `clean_message`, `_seed`) with messages that name the setting, where
    Gradio's slider check does not ("Value -5 is less than minimum value 0."), and Gradio
    preprocesses each input in a worker thread of its own: eight hand-offs from the event loop
    per chat request, which under load took longer than the reply's first token.

    `/chat`'s message is the exception: ChatInterface reads it before our function runs (and
    fails on anything but text with a bare "Error"), so that event's function checks it first.
    """
    raw = {id(component) for component in raw_inputs}
    for block_fn in demo.fns.values():
        _require(block_fn, "preprocess", "skip preprocessing for events that check their own inputs")
        takes_raw = all(block.stateful or id(block) in raw for block in block_fn.inputs)
        if block_fn.api_name == "chat":
            block_fn.fn = _text_message_first(block_fn.fn)
        elif not (block_fn.inputs and takes_raw):
            continue
        block_fn.preprocess = False


def text_message(payload) -> str:
    """The chat message as sent, or a clear error for anything but text (Gradio's ChatInterface
    would fail on it with a bare "Error" before our function runs)."""
    if not isinstance(payload, str):
        raise gr.Error(MESSAGE_NOT_TEXT, print_exception=False)
    return payload


def _text_message_first(chat_fn):
    """`/chat` as API callers need it. ChatInterface gives the page's event and the API's one
    function; the page is shown richer updates than the API returns: the reply's figures in a
    message of their own, and a refused request as a note in the chat (Gradio 6.31 locks the
    page when a chat function raises before its first update). For the API, each update is
    turned back into the reply's text alone (its `text`), and a refusal (its `refused`) into the
    error it is. Waits for a ChatInterface that keeps the page usable after an error."""

    @functools.wraps(chat_fn)
    async def checked(message, *args):
        sent = None
        async for update in chat_fn(text_message(message), *args):
            response = update[0] if isinstance(update, tuple) else None
            if getattr(response, "refused", None):
                raise gr.Error(response.refused, print_exception=False)
            if hasattr(response, "text"):
                if response.text == sent:
                    continue  # the page's last update adds the figures; the text is unchanged
                sent, update = response.text, (response.text, *update[1:])
            yield update

    return checked


def keep_message_box_editable(demo: gr.Blocks, chat: gr.ChatInterface) -> None:
    """Gradio 6.31's ChatInterface disables its message box while a reply streams (a retried or
    edited one too) and empties it when the reply ends: the next message cannot be typed
    meanwhile, and what was typed would be lost. Here the box only loses the message it sent,
    and stays editable; the page's script
    (assets/page.js) keeps Enter from sending while a reply streams, so one reply runs at a time.
    Waits for a ChatInterface that lets the next message be typed during a reply."""
    _require(chat, "_clear_and_save_textbox", "keep the message box editable while a reply streams")
    sent, ended, disabled = [], [], []
    for block_fn in demo.fns.values():
        if block_fn.fn == chat._clear_and_save_textbox:
            block_fn.fn = _take_message_keep_box
            sent.append(block_fn)
        elif _outputs_only(block_fn, chat.textbox) and _empties_and_enables(block_fn.fn):
            block_fn.fn = _enable_box
            ended.append(block_fn)
        elif _outputs_only(block_fn, chat.textbox) and _disables(block_fn.fn):
            block_fn.fn = _keep_box  # before a retried or edited message's reply
            disabled.append(block_fn)
    if not (sent and ended and disabled):
        raise RuntimeError(
            f"Gradio {gr.__version__}: ChatInterface's message box events are not where "
            "chat/gradio_costs.py expects them (keep_message_box_editable); update the workaround."
        )


def update_after_stop(demo: gr.Blocks, chat: gr.ChatInterface, update_history, state) -> None:
    """Gradio 6.31 closes a stopped chat function, which so cannot update its reply (to say it
    was stopped, with its figures). `update_history(history, state)` does it after Stop; then
    the updated conversation is copied into ChatInterface's own (`chatbot_state`), which the next
    message starts from: written at once with the shown one, it raced ChatInterface's own copy
    after the cancel and the next message lost the update. It is saved then too: ChatInterface's
    own save after the cancel can come before the update. A change to the conversation made
    before all this is done waits on the page (assets/page.js) until the last step tells it, and
    until ChatInterface's own steps after the cancelled reply have saved it (their save, landing
    after New chat or another saved chat was opened, wrote into that one). Waits for a
    ChatInterface whose function can finish a stopped reply."""
    _require(chat, "chatbot_state", "keep a stopped reply's update for the next message")
    _require(chat, "_save_conversation", "hold changes to a stopped chat until it is saved")
    saves = [(index, fn) for index, fn in demo.fns.items() if _is_save(fn.fn, chat)]
    if not saves:
        raise RuntimeError(
            f"Gradio {gr.__version__}: ChatInterface saves its chats in no step "
            "chat/gradio_costs.py can find (update_after_stop); update the workaround."
        )
    for index, block_fn in saves:
        Dependency(chat.chatbot, block_fn.get_config(), index, block_fn.fn).then(
            None, js="() => window.falconChat && window.falconChat.conversationSaved()"
        )
    chat.textbox.stop(
        update_history,
        [chat.chatbot, state],
        chat.chatbot,
        api_visibility="private",
        queue=False,
    ).then(
        lambda history: history,
        chat.chatbot,
        chat.chatbot_state,
        api_visibility="private",
        queue=False,
    ).then(
        chat._save_conversation,
        [chat.conversation_id, chat.chatbot_state, chat.saved_conversations],
        [chat.conversation_id, chat.saved_conversations],
        api_visibility="private",
        queue=False,
    ).then(None, js="() => window.falconChat && window.falconChat.stopSettled()")


def stop_edited_replies(demo: gr.Blocks, chat: gr.ChatInterface) -> None:
    """Gradio 6.31's ChatInterface shows Stop for a message's reply and a retried one, and Stop
    cancels them, but not the reply to an edited message: it had no Stop (nor Escape), and ran to
    its end with the message box disabled. The edit gets what Retry has (ChatInterface's
    `_setup_stop_events`): Stop shown when it is sent, its reply among those Stop cancels, Send
    back when the reply ends, and the steps after it (ChatInterface's copy of the conversation,
    its save) taken after a stopped reply too. Waits for a
    ChatInterface that can stop an edited message's reply."""
    textbox, chatbot = chat.textbox, chat.chatbot
    edit = _event_chain(demo, chatbot._id, "edit")
    reply = next((index for index in edit if demo.fns[index].name == "_submit_fn"), None)
    stop = next(
        (fn for fn in demo.fns.values() if fn.is_cancel_function and (textbox._id, "stop") in fn.targets),
        None,
    )
    _require(chat, "original_stop_btn", "show Stop for an edited message's reply")
    if reply is None or stop is None:
        raise RuntimeError(
            f"Gradio {gr.__version__}: ChatInterface's edit and Stop events are not where "
            "chat/gradio_costs.py expects them (stop_edited_replies); update the workaround."
        )
    stop.cancels.append(reply)
    for index in edit[edit.index(reply) + 1 :]:
        demo.fns[index].trigger_only_on_success = False  # a stopped reply is saved too, as Retry's
    shows_stop = dict(submit_btn=False, stop_btn=chat.original_stop_btn)
    chatbot.edit(lambda: gr.update(**shows_stop), None, textbox, api_visibility="private", queue=False)
    shows_send = dict(submit_btn=textbox.submit_btn, stop_btn=False)
    Dependency(chatbot, demo.fns[reply].get_config(), reply, demo.fns[reply].fn).then(
        lambda: gr.update(**shows_send), None, textbox, api_visibility="private", queue=False
    )


def _event_chain(demo: gr.Blocks, block_id: int, event: str) -> list[int]:
    """The indices of `demo`'s functions that `block_id`'s `event` runs, one after the other."""
    chain = [index for index, fn in demo.fns.items() if (block_id, event) in fn.targets][:1]
    while chain:
        following = [index for index, fn in demo.fns.items() if fn.trigger_after == chain[-1]]
        if not following:
            break
        chain.append(following[0])
    return chain


def _keep_box():
    return gr.update()


def _call_if_plain(fn):
    """What `fn` returns if it takes no arguments and is not a coroutine function, else None."""
    if fn is None or inspect.iscoroutinefunction(fn) or inspect.signature(fn).parameters:
        return None
    return fn()


def save_no_empty_chats(demo: gr.Blocks, chat: gr.ChatInterface) -> None:
    """Gradio 6.31's ChatInterface saves a chat emptied by Undo as an empty conversation, which
    its list of saved chats leaves out while a click on the list opens the conversation at the
    clicked row's place in the whole list: every chat below an empty one opened the one above it.
    Each save here drops the empty conversations (an emptied chat leaves the list) and keeps the
    open chat's place, and one whose place is not in the list it was sent saves the chat afresh
    (Gradio's save failed with an IndexError). Waits for a ChatInterface whose list and saves
    agree."""
    _require(chat, "_save_conversation", "keep empty chats out of the saved chats")
    for block_fn in demo.fns.values():
        if _is_save(block_fn.fn, chat):
            block_fn.fn = _dropping_empty_chats(chat._save_conversation)


def _is_save(fn, chat: gr.ChatInterface) -> bool:
    return getattr(fn, "__wrapped__", fn) == chat._save_conversation


def _dropping_empty_chats(save):
    @functools.wraps(save)
    def save_conversation(index, conversation, saved_conversations):
        if index is not None and not 0 <= index < len(saved_conversations or []):
            # The open chat's place is kept on the server, the list in the browser: a save that
            # left before the one that listed this chat came back brings the list without it
            # (two saves end a stopped reply). Gradio's save fails on it; saved afresh instead.
            index = None
        index, saved = save(index, conversation, saved_conversations)
        if not saved:
            return index, saved
        if index is not None:
            index = index - sum(1 for kept in saved[:index] if not kept) if saved[index] else None
        return index, [kept for kept in saved if kept]

    return save_conversation


def event_watch(demo: gr.Blocks) -> Callable[[], Callable[[], bool] | None]:
    """For the event of `demo` running now (called in its context): a check of whether Gradio
    has marked it dead, which Gradio 6.31 does when the session's event stream closes (a closed
    page or API client: `Queue.clean_events`) but acts on only when the event next yields, and a
    reply waiting for its first token does not yield. None outside an event. Asked by
    chat.bridge while a reply waits. Waits for Gradio to end such events itself."""
    from gradio.context import LocalContext

    _require(LocalContext, "event_id", "notice a closed page before a reply's first token")
    _require(demo, "_queue", "notice a closed page before a reply's first token")
    _require(demo._queue, "active_jobs", "notice a closed page before a reply's first token")

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


def _take_message_keep_box(message):
    return gr.update(value=""), message


def _enable_box():
    return gr.update(interactive=True)


def _outputs_only(block_fn, component) -> bool:
    return not block_fn.inputs and [id(block) for block in block_fn.outputs] == [id(component)]


def _empties_and_enables(fn) -> bool:
    """Whether `fn` is ChatInterface's `lambda: update(value=None, interactive=True)`."""
    return _call_if_plain(fn) == {"__type__": "update", "value": None, "interactive": True}


def _disables(fn) -> bool:
    """Whether `fn` is one of ChatInterface's `lambda: update(interactive=False, ...)`."""
    update = _call_if_plain(fn)
    return (
        isinstance(update, dict) and update.get("__type__") == "update" and update.get("interactive") is False
    )


def check_value_counts(demo: gr.Blocks) -> None:
    """An API call with fewer values than the endpoint takes fails inside Gradio with a ValueError
    the client only sees as `{"error": null}`; more values are silently dropped. Refuse both with
    a message that says how many values the endpoint takes, in which order (Gradio 6.31,
    `Blocks.validate_inputs`, called before anything of the event runs)."""
    _require(demo, "validate_inputs", "name the values an API endpoint takes")
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
    _require(SessionState, "_update_value_in_config", "keep no session's input values")

    def _update_value_in_config(self, key, value):  # noqa: ARG001 - Gradio's signature
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

    _require(gradio.blocks, "inspect", "cache component signatures")
    if not isinstance(gradio.blocks.inspect, _InspectWith):
        gradio.blocks.inspect = _InspectWith(signature=functools.lru_cache(maxsize=1024)(inspect.signature))


class _InspectWith(types.ModuleType):
    """The `inspect` module for one of Gradio's modules, with some of its functions replaced."""

    def __init__(self, **replaced):
        super().__init__("inspect")
        vars(self).update(replaced)

    def __getattr__(self, name):  # only asked for what is not replaced
        return getattr(inspect, name)


def show_messages_as_written() -> None:
    """Gradio 6.31's Chatbot passes every text message through `inspect.cleandoc`, which takes
    away the indentation that a message's lines after the first share (and the first line's, and
    blank lines at both ends). A message whose later lines were all indented code showed as plain
    text, and came back so as history: the model's next prompt had the code changed. Messages
    are shown as they were written; `gradio.components.chatbot` is given an `inspect` whose
    `cleandoc` leaves the text alone. Waits for a Chatbot that keeps text as it is."""
    import gradio.components.chatbot

    _require(gradio.components.chatbot, "inspect", "show messages as they were written")
    if not isinstance(gradio.components.chatbot.inspect, _InspectWith):
        gradio.components.chatbot.inspect = _InspectWith(cleandoc=lambda text: text)
