"""The chat's events, on Gradio's public API: a `gr.Chatbot`, a message box, and the page's script.

The conversation lives in the browser: assets/chats.js keeps every chat in the browser's storage
(one entry per chat), shows the open one in the Chatbot, and builds each request. Each action on
the page (Send, Retry, Edit, Continue or Retry under a reply) runs as three steps:

1. in the browser, the conversation changes and the box shows Stop (a `js=` step);
2. on the server, `PageHandlers.reply` answers the request the script built (the conversation, or
   its newest part where it is long: never more than a request may carry), streaming only the
   reply, on a hidden channel (`reply_channel`) that the script merges into the conversation;
3. in the browser, Send comes back.

Stop cancels step 2 and asks `figures_after_stop` for the stopped reply's note and figures. Undo,
New chat, the trash and opening a saved chat are browser-only steps. `/chat`, for API clients, is
a listener of its own that keeps a client's conversation on the server, as Gradio's ChatInterface
did, with the same inputs and output.

Why not `gr.ChatInterface`: it keeps its own copy of the conversation (a `gr.State` its events
start from) and saves every chat, whole, through a `gr.BrowserState` keyed with a secret made at
each start; loading a chat, keeping versions, Continue and a reply kept across a reload all need
to write that copy, which it offers no public way to do, and its events could only be changed by
finding them among the app's functions (issue #22, point 2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import gradio as gr

from chat.conversation.reply import MESSAGE_NOT_TEXT
from chat.web.handlers import PageHandlers

SETTINGS_STORAGE_KEY = "falcon-chat-settings"  # where assets/chats.js keeps the settings
TOO_LONG_TO_EXPORT = (
    "This chat is too long to export here ({megabytes:.1f} MB; a request may carry {limit:.1f} MB): "
    "Copy conversation copies all of it."
)
API_DESCRIPTION = "The chat: the reply to `message`, after the conversation this client had so far."
# What the browser-side steps call (assets/chats.js); `falconChat` is made before Gradio starts.
# A reply's last step gets the channel's last value: its final update, figures and all.
SEND_BACK = "(update) => window.falconChat.replyEnded(update)"


# The `js=` of a reply's server step: the request the script built, then the settings as they are.
REQUEST = "(request, ...rest) => [window.falconChat.request(), ...rest]"


@dataclass
class ChatView:
    """The chat's components (laid out by chat/web/page.py), and the hidden ones its events use."""

    chatbot: gr.Chatbot
    textbox: gr.Textbox
    settings: list  # the system prompt, then the generation settings, in `/chat`'s order
    new_chat: gr.Button
    copy_conversation: gr.Button
    export_button: gr.Button
    files: gr.File
    session: gr.State = field(default_factory=lambda: gr.State({}))
    # The message a Send step checked, and in its place the request the script builds (never shown).
    carrier: gr.Textbox = field(default_factory=lambda: gr.Textbox(label="Page's request", visible=False))
    # The reply as it streams: rendered but hidden, so that its change reaches the script.
    reply_channel: gr.Textbox = field(
        default_factory=lambda: gr.Textbox(visible="hidden", elem_id="reply-channel", show_label=False)
    )
    # Clicked by the script to show the chat it opens (a saved chat, a version, after a reload).
    show_chat: gr.Button = field(
        default_factory=lambda: gr.Button("Show chat", visible="hidden", elem_id="show-chat")
    )


def wire_chat(demo: gr.Blocks, view: ChatView, handlers: PageHandlers, *, concurrency_limit: int) -> None:
    """The chat's events (see the module's docstring)."""
    chatbot, textbox = view.chatbot, view.textbox
    inputs = [view.carrier, *view.settings, view.session]
    streaming = dict(
        outputs=[view.reply_channel],
        preprocess=False,  # the request is the script's own value; `reply` checks it
        show_progress="minimal",
        show_progress_on=[chatbot],  # the Chatbot shows the reply is coming, and hides its buttons
        concurrency_limit=concurrency_limit,
        concurrency_id="chat",  # one limit for every kind of reply, the API's too
        api_visibility="private",
    )
    quick = dict(api_visibility="private", queue=False, show_progress="hidden")

    shown = [textbox, chatbot]  # a first step shows Stop, and the conversation as it now is

    def reply_steps(started) -> gr.events.Dependency:
        stream = started.then(handlers.reply, inputs, js=REQUEST, **streaming)
        stream.then(None, view.reply_channel, shown, js=SEND_BACK, **quick)
        return stream

    # Send: the message is checked on the server first, so a refused one stays in the box.
    sent = textbox.submit(
        take_message,
        textbox,
        [textbox, view.carrier],
        validator=lambda message: _validation(handlers.message_problem(message)),
        api_visibility="private",
        queue=True,  # Gradio 6.31 runs a validator only before a queued function
        show_progress="hidden",
    )
    send = sent.success(None, view.carrier, shown, js="(message) => window.falconChat.start('send', message)")
    streams = [reply_steps(send)]
    retry = chatbot.retry(None, None, shown, js="() => window.falconChat.start('retry')")
    streams.append(reply_steps(retry))
    # An edit: Gradio has already put the edited text in the Chatbot's value, where the script reads it.
    edit = chatbot.edit(None, chatbot, shown, js="(history) => window.falconChat.start('edit', history)")
    streams.append(reply_steps(edit))
    # Continue and Retry under a reply (Gradio's message options): the page's script puts the one
    # clicked in the request.
    streams.append(
        reply_steps(chatbot.option_select(None, None, shown, js="() => window.falconChat.start('option')"))
    )

    view.reply_channel.change(
        None, view.reply_channel, chatbot, js="(update) => [window.falconChat.replied(update)]"
    )
    textbox.stop(None, cancels=streams)
    textbox.stop(
        handlers.figures_after_stop,
        [view.reply_channel, view.session],
        view.reply_channel,
        js="(reply, session) => [window.falconChat.replySoFar(), session]",
        preprocess=False,
        **quick,
    ).then(
        # On the server, though it does nothing there: Gradio 6.31 can mark the cancelled reply
        # as failed after Stop ("Error" over the conversation, left there until an event of the
        # server's next touches the Chatbot); this one ends cleanly and clears it.
        _unchanged,
        view.reply_channel,
        chatbot,
        js="(update) => [window.falconChat.stopSettled(update)]",
        **quick,
    )

    chatbot.undo(None, None, [chatbot, textbox], js="() => window.falconChat.undo()")
    chatbot.clear(None, js="() => window.falconChat.deleteOpenChat()")
    chatbot.example_select(example_text, None, textbox, **quick)
    for opened in (
        view.new_chat.click(None, None, chatbot, js="() => [window.falconChat.newChat()]"),
        view.show_chat.click(None, None, chatbot, js="() => [window.falconChat.shown()]"),
    ):
        opened.then(lambda: gr.update(value=None, visible=False), None, view.files, **quick)
    demo.load(None, None, chatbot, js="() => [window.falconChat.opening()]")

    view.copy_conversation.click(
        None, chatbot, None, js="(history) => window.falconChat.copyConversation(history)"
    )
    view.export_button.click(
        _export(handlers),
        [chatbot, view.settings[0], view.carrier],
        view.files,
        js="(history, systemPrompt) => window.falconChat.exportRequest(history, systemPrompt)",
        preprocess=False,  # `export` reads the page's messages itself (chat.conversation.turns)
        api_name="export",
        api_visibility="private",
    )
    _api_chat(view, handlers, concurrency_limit=concurrency_limit)


def _unchanged(_):
    return gr.skip()


def take_message(message):
    """Step 1 of Send, on the server once the message is checked: the box empties (it shows Stop
    until the reply ends), and the message goes to the script."""
    return gr.update(value="", submit_btn=False, stop_btn="Stop"), message


def _export(handlers: PageHandlers):
    def export(history, system_prompt, about):
        """The chat's files, shown above the message box; a chat larger than a request may be is
        said to be so (the page sent none of it)."""
        too_long = about.get("too_long") if isinstance(about, dict) else None
        if isinstance(too_long, int):
            limit = handlers.settings.max_request_bytes / 1e6
            gr.Warning(TOO_LONG_TO_EXPORT.format(megabytes=too_long / 1e6, limit=limit))
            return gr.update()
        return gr.update(value=handlers.export(history, system_prompt, about), visible=True)

    return export


def example_text(example: gr.SelectData) -> str:
    """An example fills the box, to be edited and sent."""
    value = example.value if isinstance(example.value, dict) else {}
    return str(value.get("text") or "")


def _validation(problem: str | None):
    return gr.validate(problem is None, problem or "")


def _api_chat(view: ChatView, handlers: PageHandlers, *, concurrency_limit: int) -> None:
    """`/chat`: `message`, then the settings; the reply's text. A client's conversation is kept on
    the server (a `gr.State`), so a `gradio_client.Client` goes on with it across calls."""

    async def chat(
        message,
        history,
        system_prompt,
        temperature,
        max_new_tokens,
        top_p,
        repetition_penalty,
        seed=None,
        session=None,
    ):
        if not isinstance(message, str):
            raise gr.Error(MESSAGE_NOT_TEXT, print_exception=False)
        history = history if isinstance(history, list) else []
        sent = None
        settings = (system_prompt, temperature, max_new_tokens, top_p, repetition_penalty, seed, session)
        async for reply in handlers.respond(message, history, *settings):
            if reply.refused:
                raise gr.Error(reply.refused, print_exception=False)
            if reply.text != sent:  # the last update adds the figures; the words are the same
                sent = reply.text
                yield reply.text, history
        words = [{"role": "user", "content": message}, {"role": "assistant", "content": sent or ""}]
        yield sent, history + words

    trigger, conversation = gr.Button(visible=False), gr.State([])
    trigger.click(
        chat,
        [view.textbox, conversation, *view.settings, view.session],
        [gr.JSON(label="Response", visible=False), conversation],
        api_name="chat",
        api_description=API_DESCRIPTION,
        preprocess=False,  # every value is checked by `respond` (GenerationParams, clean_message)
        postprocess=False,
        concurrency_limit=concurrency_limit,
        concurrency_id="chat",
    )


def keep_settings(demo: gr.Blocks, inputs: list) -> None:
    """The system prompt and settings are kept in the browser (plain storage under our own key,
    which a restart of the server does not change; in frames denied storage, the in-memory
    stand-in of chat/web/embedding.py) and restored on load by the page itself, each checked
    against its input (`setting_checks`); the server checks every value again when it is used.

    Restored in the page, not through the server: the server's answer to the page's load came
    back after a person (on a slow network) had typed a setting, and put its slider back."""
    gr.on(
        [component.change for component in inputs],
        None,
        inputs,
        None,
        js="(...values) => window.falconChat.saveSettings(values)",
    )
    checks = json.dumps(setting_checks(inputs))
    defaults = json.dumps([component.value for component in inputs])
    demo.load(
        None,
        inputs,
        inputs,
        js=f"(...current) => window.falconChat.restoredSettings({checks}, {defaults}, current)",
    )


def setting_checks(inputs: list) -> list:
    """What a saved value must be to be restored into each of `inputs` (assets/chats.js): a
    slider's `[minimum, maximum]`, or None for text (of at most 20,000 characters)."""
    return [[c.minimum, c.maximum] if isinstance(c, gr.Slider) else None for c in inputs]
