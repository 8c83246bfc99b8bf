"""What Gradio 6.31's ChatInterface does wrong on the page, and what this app does about each.

A locked page after an error, a message box disabled while a reply streams, a stopped reply that
cannot be updated (and the changes made before it is), an edited message's reply that cannot be
stopped, empty saved chats that shift the list, messages shown with their indentation taken away.
Each reaches inside ChatInterface's events, checks at start-up that what it touches is there
(`gradio_costs.require`, or a RuntimeError naming the Gradio version), and says what it waits
for. Their effects are checked in a browser (tests/browser/test_page.py). What must run in the
browser (Enter on an empty box or during a reply, holding clicks until a stopped reply is
finished, a button Gradio leaves unnamed, what "Copy message" and "Copy conversation" copy) is in
assets/page.js.
"""

from __future__ import annotations

import functools
import inspect

import gradio as gr
from gradio.events import Dependency

from chat.web.gradio_patches.costs import InspectWith, require


def keep_message_box_editable(demo: gr.Blocks, chat: gr.ChatInterface) -> None:
    """Gradio 6.31's ChatInterface disables its message box while a reply streams (a retried or
    edited one too) and empties it when the reply ends: the next message cannot be typed
    meanwhile, and what was typed would be lost. Here the box only loses the message it sent,
    and stays editable; the page's script
    (assets/page.js) keeps Enter from sending while a reply streams, so one reply runs at a time.
    Waits for a ChatInterface that lets the next message be typed during a reply."""
    require(chat, "_clear_and_save_textbox", "keep the message box editable while a reply streams")
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
            "chat/web/gradio_patches/chat_interface.py expects them (keep_message_box_editable); update the workaround."
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
    require(chat, "chatbot_state", "keep a stopped reply's update for the next message")
    require(chat, "_save_conversation", "hold changes to a stopped chat until it is saved")
    saves = [(index, fn) for index, fn in demo.fns.items() if _is_save(fn.fn, chat)]
    if not saves:
        raise RuntimeError(
            f"Gradio {gr.__version__}: ChatInterface saves its chats in no step "
            "chat/web/gradio_patches/chat_interface.py can find (update_after_stop); update the workaround."
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
    require(chat, "original_stop_btn", "show Stop for an edited message's reply")
    if reply is None or stop is None:
        raise RuntimeError(
            f"Gradio {gr.__version__}: ChatInterface's edit and Stop events are not where "
            "chat/web/gradio_patches/chat_interface.py expects them (stop_edited_replies); update the workaround."
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
    require(chat, "_save_conversation", "keep empty chats out of the saved chats")
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


def show_messages_as_written() -> None:
    """Gradio 6.31's Chatbot passes every text message through `inspect.cleandoc`, which takes
    away the indentation that a message's lines after the first share (and the first line's, and
    blank lines at both ends). A message whose later lines were all indented code showed as plain
    text, and came back so as history: the model's next prompt had the code changed. Messages
    are shown as they were written; `gradio.components.chatbot` is given an `inspect` whose
    `cleandoc` leaves the text alone. Waits for a Chatbot that keeps text as it is."""
    import gradio.components.chatbot

    require(gradio.components.chatbot, "inspect", "show messages as they were written")
    if not isinstance(gradio.components.chatbot.inspect, InspectWith):
        gradio.components.chatbot.inspect = InspectWith(cleandoc=lambda text: text)
