"""The page: a chat tab (a `gr.Chatbot` and message box, the saved chats beside them), a completion
tab, and launching. The chats are kept in the browser by the page's script (assets/chats.js);
what each event does lives in chat/web/handlers.py, how they are wired in chat/web/chat_events.py;
this module only lays the page out.

The UI never knows which backend it talks to. API endpoints:
- `/chat`: `client.predict(message, system_prompt, temperature, max_new_tokens, top_p,
  repetition_penalty, seed, api_name="/chat")` returns the reply's text; a Client keeps its
  conversation across calls;
- `/reply_stats`: the figures of this session's last reply, as JSON;
- `/complete`: `client.predict(text, temperature, max_new_tokens, top_p, repetition_penalty, seed,
  stop, api_name="/complete")`, raw continuation for base models.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import gradio as gr

from chat.config import Settings
from chat.conversation.backend import Backend
from chat.conversation.inline_math import LATEX_DELIMITERS
from chat.conversation.params import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_REPETITION_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    MAX_REPETITION_PENALTY,
    MAX_TEMPERATURE,
    MIN_REPETITION_PENALTY,
)
from chat.web.chat_events import ChatView, keep_settings, wire_chat
from chat.web.connections import ClientLimits
from chat.web.embedding import embedding_launch_options
from chat.web.gradio_patches.costs import trim_gradio_costs
from chat.web.gradio_patches.queue import event_watch, queue_size
from chat.web.handlers import PageHandlers, Refused
from chat.web.operations import Operations
from chat.web.security import (
    harden_demo,
    harden_launch_options,
    markdown_code,
    private_gradio_cache,
    text_only_chatbot,
)
from chat.web.theme import page_theme

ASSETS = Path(__file__).resolve().parents[2] / "assets"
TITLE = "Falcon Chat"
# Prompts from the Falcon-180B announcement and its SageMaker notebook.
EXAMPLES = [
    "Translate to French: I love the sea, the mountains and long summer evenings.",
    'Is the sentiment of this tweet positive or negative? "The new update is fantastic, finally!"',
    "Write a haiku about a falcon over the city at dawn.",
    "Turn this email into a table with the columns name, date and amount: "
    '"Hi, Alice paid 120 EUR on 1 September and Bob paid 80 EUR on 3 September."',
    "Plan a three-day trip to Lisbon for two people who love food, museums and walking.",
    "Give me a recipe for a simple tomato soup, with the steps numbered.",
]

# Few-shot prompts for base models (no chat format), from the same documents; (text, stop at).
COMPLETION_PRESETS = {
    "Tweet sentiment": (
        'Tweet: "I hate it when my phone battery dies."\nSentiment: Negative\n###\n'
        'Tweet: "My day has been 👍"\nSentiment: Positive\n###\n'
        'Tweet: "This is the link to the article"\nSentiment: Neutral\n###\n'
        'Tweet: "This new music video was incredible"\nSentiment:',
        "\\n",
    ),
    "English to French": (
        "Translate English to French:\nsea otter => loutre de mer\npeppermint => menthe poivrée\n"
        "plush giraffe => girafe en peluche\ncheese =>",
        "\\n",
    ),
}


def build_demo(backend: Backend, settings: Settings, operations: Operations | None = None) -> gr.Blocks:
    """The page for `backend`; its replies are counted and logged in `operations` (whose routes
    `launch_options` serves), a fresh one if none is given."""
    private_gradio_cache()  # before any component is made: each notes the folder
    operations = operations or Operations(backend, log_messages=settings.log_messages)
    handlers = PageHandlers(backend, settings, operations)
    # Full width and height: the style sheet (assets/style.css) sets the page's own bounds.
    with gr.Blocks(title=TITLE, fill_height=True, fill_width=True) as demo:
        gr.HTML(banner(backend), elem_id="banner")
        # Shown on each page load while the backend cannot serve (a server that is down), so a
        # person learns it before typing a message, not from the first reply.
        server_state = gr.Markdown(visible=False, elem_id="server-state")
        with gr.Tab("Chat", elem_id="chat-tab"):
            _chat_tab(demo, handlers)
        with gr.Tab("Completion", elem_id="completion-tab"):
            _completion_tab(handlers)
        demo.load(
            lambda: _shown_if_any(operations.server_state()),
            None,
            server_state,
            api_visibility="private",
            queue=False,
            show_progress="hidden",
        )
    harden_demo(demo)
    trim_gradio_costs(demo)
    handlers.event_gone = event_watch(demo)
    # A full queue turns new requests away at once instead of letting them wait for minutes: the
    # page says "This application is currently busy. Please try again.", gradio_client raises
    # QueueError("Queue is full! Please try again."), the REST route answers HTTP 503.
    demo.queue(max_size=settings.queue_size)
    operations.watch_queue(queue_size(demo))
    return demo


def _chat_tab(demo: gr.Blocks, handlers: PageHandlers) -> None:
    """The chat, the saved chats beside it (a sidebar on desktop, a drawer on phones), its
    settings (kept in the browser), export and `/reply_stats`."""
    backend, settings = handlers.backend, handlers.settings
    system_prompt = gr.Textbox(settings.system_prompt, label="System prompt", lines=2, render=False)
    chat_settings = [system_prompt, *_settings_inputs(_max_tokens_limit(backend), render=False)]
    # Gradio's own "Copy conversation" copies each figures' message as an empty "assistant:" and
    # the text as shown (6.31 has no way to leave display-only messages out): the page's script
    # (assets/page.js) copies the turns as the model wrote them.
    copy_conversation = gr.Button("Copy conversation", size="sm", render=False)
    with gr.Row(scale=1, elem_id="chat-row"):
        with gr.Column(scale=1, min_width=100, elem_id="chat-sidebar"):
            new_chat = gr.Button("New chat", variant="primary", icon=ASSETS / "plus.svg", elem_id="new-chat")
            # The saved chats: drawn, searched and renamed by the page's script (assets/chats.js).
            gr.HTML("", elem_id="saved-chats", padding=False)
            # At the foot of the saved chats, out of the chat's height.
            with gr.Row(elem_id="chat-tools"):
                export_button = gr.Button("⬇ Export conversation (Markdown, JSON)", size="sm")
            files = gr.File(
                label="Conversation files",
                file_count="multiple",
                interactive=False,
                visible=False,
                elem_id="export-files",
            )
        with gr.Column(scale=6, elem_id="chat-main") as main:
            chatbot = gr.Chatbot(
                label="Conversation",
                show_label=False,
                elem_id="conversation",
                height=None,
                scale=1,
                buttons=["copy", copy_conversation],
                latex_delimiters=LATEX_DELIMITERS,
                # Gradio's own following pulls a reader who scrolls up back down (it queues a scroll
                # after every update); assets/follow.js follows only while the reader is at the end.
                autoscroll=False,
                # Shown in the empty chat, above the examples: what the page talks to, and how.
                placeholder=description(backend),
                examples=[{"text": example} for example in EXAMPLES],  # they fill the box
                editable="user",
                **text_only_chatbot(),  # forms, images, styles in a message show as text
            )
            with gr.Group(), gr.Row():
                textbox = gr.Textbox(
                    label="Message",
                    show_label=False,
                    placeholder="Type a message…",
                    elem_id="message",
                    lines=1,
                    max_lines=8,
                    scale=7,
                    autofocus=False,  # the page script focuses it without scrolling the page away
                    submit_btn="Send",
                    stop_btn=False,  # shown while a reply streams (chat/web/chat_events.py)
                )
            # Beside the message box; open, it lies over the conversation (assets/style.css).
            with gr.Accordion("System prompt and settings", open=False, elem_id="settings"):
                for component in chat_settings:
                    component.render()
    _show_fixed_seed(main, chat_settings[-1])
    view = ChatView(
        chatbot=chatbot,
        textbox=textbox,
        settings=chat_settings,
        new_chat=new_chat,
        copy_conversation=copy_conversation,
        export_button=export_button,
        files=files,
    )
    wire_chat(demo, view, handlers, concurrency_limit=_concurrency(handlers))
    keep_settings(demo, chat_settings)
    stats_button = gr.Button(visible=False)
    stats_button.click(
        # Labelled, so the API's description names the output (not "value_43").
        handlers.reply_stats,
        view.session,
        gr.JSON(label="figures", visible=False),
        api_name="reply_stats",
        queue=False,
    )


def _show_fixed_seed(column: gr.Column, seed: gr.Textbox) -> None:
    """A fixed seed shows beside the message box, with a button that clears it: the seed is
    kept across replies and reloads, and Retry with it gives the same reply again."""
    with column:  # the conversation's column, so it sits in the message box's row
        chip = gr.Button("", visible=False, size="sm", elem_id="fixed-seed")
    seed.change(
        fixed_seed_button,
        seed,
        chip,
        api_visibility="private",
        queue=False,
        show_progress="hidden",
    )
    chip.click(lambda: "", None, seed, api_visibility="private", queue=False, show_progress="hidden")


def fixed_seed_button(seed) -> dict:
    """The fixed seed's button for the seed box's text: shown, with the seed, while one is set."""
    text = str(seed or "").strip()
    return gr.update(visible=bool(text), value=f"Seed {text[:20]} ✕")


def _completion_tab(handlers: PageHandlers) -> list:
    """Raw continuation (`/complete`) with few-shot presets; returns its inputs."""
    gr.Markdown(
        "For base models, which have no chat format: the model continues your text as it is "
        "written. The presets show few-shot prompts.",
        elem_id="completion-about",
    )
    text = gr.Textbox(label="Text to continue", lines=8)
    preset = gr.Dropdown(list(COMPLETION_PRESETS), label="Few-shot presets", value=None)
    output = gr.Textbox(label="Continuation", lines=6, interactive=False)
    with gr.Row():
        generate_button = gr.Button("Generate", variant="primary")
        stop_button = gr.Button("Stop", variant="stop")
    with gr.Accordion("Settings", open=False):
        stop = gr.Textbox("", label="Stop at", info="comma-separated; \\n for a newline")
        completion_settings = _settings_inputs(_max_tokens_limit(handlers.backend), render=True)
    preset.change(
        lambda name: COMPLETION_PRESETS.get(name, ("", ""))[:2],
        preset,
        [text, stop],
        api_name="preset",
        api_visibility="private",
    )
    generation = generate_button.click(
        _completion(handlers),
        [text, *completion_settings, stop],
        output,
        api_name="complete",
        preprocess=False,  # every value is checked by `handlers.complete`, with messages naming it
        concurrency_limit=_concurrency(handlers),
    )
    stop_button.click(None, cancels=[generation])
    return [text, *completion_settings, stop]


def _shown_if_any(text: str):
    return gr.update(value=text, visible=bool(text))


def _max_tokens_limit(backend: Backend) -> int:
    return min(backend.context_length(), 4096)


def _concurrency(handlers: PageHandlers) -> int:
    return handlers.settings.concurrency_limit or handlers.backend.concurrency_limit


def _completion(handlers: PageHandlers):
    """`handlers.complete` for Gradio: a refusal is an error (a toast; the tab stays usable)."""

    async def complete(text, temperature, max_new_tokens, top_p, repetition_penalty, seed, stop):
        try:
            async for continuation in handlers.complete(
                text, temperature, max_new_tokens, top_p, repetition_penalty, seed, stop
            ):
                yield continuation
        except Refused as refusal:
            raise gr.Error(refusal.reason, print_exception=False) from None

    return complete


def launch_options(settings: Settings, operations: Operations | None = None) -> dict:
    """Keyword arguments for `demo.launch` (Gradio 6 takes theme and CSS here); with `operations`,
    its /healthz and /metrics are served by Gradio's own FastAPI app."""
    embedding = embedding_launch_options(settings.allow_embed_from)
    options = dict(
        server_name=settings.host,
        server_port=settings.port,
        theme=page_theme(),
        footer_links=["api", "gradio"],
        # The chat's trash deletes the chat, saved copy included: its name says so (in English;
        # Gradio's other languages already say "clear the chat").
        i18n=gr.I18n(en={"chatbot.clear": "Delete chat"}),
        **embedding,
    )
    # The storage fallback for frames first; then the page's style sheet and script.
    options["head"] = embedding["head"] + page_head(settings)
    if operations is not None:
        app_kwargs = dict(options.get("app_kwargs") or {})
        app_kwargs["routes"] = [*app_kwargs.get("routes", []), *operations.routes()]
        options["app_kwargs"] = app_kwargs
        # Each running reply holds one of Gradio's worker threads while it waits for its next
        # token; with Gradio's default of 40, the 41st concurrent reply waits for a thread.
        concurrency = settings.concurrency_limit or operations.backend.concurrency_limit
        options["max_threads"] = max(40, 2 * concurrency + 8)  # chat and completion, plus the rest
    limits = ClientLimits(
        settings.request_timeout_s, settings.connections_per_client, settings.requests_per_second
    )
    return harden_launch_options(
        options,
        max_request_bytes=settings.max_request_bytes,
        frame_origins=settings.allow_embed_from,
        limits=limits,
    )


# The page's scripts, each with one job: the chats, kept in the browser (chats.js); keyboard, focus
# and confirmations (page.js); following a streaming reply only while the reader is at its end
# (follow.js); the layout's drawer and the names Gradio leaves wrong (layout.js). And their style
# sheets: the page's layout and colours (style.css), what chats.js draws (chats.css).
PAGE_SCRIPTS = ("chats.js", "page.js", "follow.js", "layout.js")
PAGE_STYLES = ("style.css", "chats.css")


def page_head(settings: Settings | None = None) -> str:
    """The page's style sheets (PAGE_STYLES) and scripts (PAGE_SCRIPTS), with the limit the chats'
    script keeps its requests under. The style sheet goes in the head rather than through
    `launch(css=...)`: Gradio scopes that to the app's content, and inside media queries keeps
    only the scoped rules, so a phone layout could not reach the page's padding or footer."""
    limits = {"maxRequestBytes": (settings or Settings()).max_request_bytes}
    style = "".join((ASSETS / name).read_text(encoding="utf-8") for name in PAGE_STYLES)
    scripts = [f"window.falconChatLimits = {json.dumps(limits)};"]
    scripts += [(ASSETS / name).read_text(encoding="utf-8") for name in PAGE_SCRIPTS]
    return f"<style>\n{style}</style>\n" + "".join(f"<script>\n{script}</script>\n" for script in scripts)


def _settings_inputs(max_tokens_limit: int, *, render: bool) -> list:
    return [
        _slider(0.0, MAX_TEMPERATURE, 0.05, DEFAULT_TEMPERATURE, "Temperature", "0 = greedy", render),
        _slider(
            1,
            max_tokens_limit,
            1,
            min(DEFAULT_MAX_NEW_TOKENS, max_tokens_limit),
            "Max new tokens",
            "",
            render,
        ),
        _slider(0.01, 1.0, 0.01, DEFAULT_TOP_P, "Top-p", "1.0 = off", render),
        _slider(
            MIN_REPETITION_PENALTY,
            MAX_REPETITION_PENALTY,
            0.05,
            DEFAULT_REPETITION_PENALTY,
            "Repetition penalty",
            "1.0 = off",
            render,
        ),
        gr.Textbox(
            "",
            label="Seed",
            placeholder="random",
            info="a whole number repeats a reply exactly; empty = random",
            render=render,
        ),
    ]


def _slider(low, high, step, value, label, info, render) -> gr.Slider:
    return gr.Slider(low, high, value=value, step=step, label=label, info=info or None, render=render)


def model_label(backend: Backend) -> str:
    """The model's name as the page shows it: a local folder by its own name, not its whole path."""
    name = backend.model_name
    if "/" in name and (name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().is_dir()):
        return Path(name).name or name
    return name


def banner(backend: Backend) -> str:
    """The page's slim header: the Falcon mark, the app's name and, most visibly, the model the
    page talks to (a long name is cut short on screen and whole in its tooltip)."""
    mark = (ASSETS / "banner.svg").read_text(encoding="utf-8")
    model = html.escape(model_label(backend))
    # On phones the saved chats are a drawer, opened by the first button (assets/layout.js).
    toggle = (
        '<button type="button" class="falcon-chats-toggle" aria-controls="chat-sidebar" '
        'aria-expanded="false" aria-label="Saved chats" title="Saved chats"></button>'
    )
    return (
        f'<div class="falcon-header">{toggle}{mark}<span class="falcon-name">Falcon Chat</span>'
        f'<span class="falcon-model" title="{model}">{model}</span></div>'
    )


def description(backend: Backend) -> str:
    """What the empty chat says above the examples: which model, through which backend, in which
    prompt format, and what the backend says about its model (`Backend.notice`: a small default,
    how to switch)."""
    # The model's name can come from a server (TGI's /info, a /v1/models list): shown as text.
    model = markdown_code(model_label(backend))
    text = f"Chatting with {model} through {backend.name}, in {backend.prompt_format.description}."
    if backend.notice:
        text += f"<br>{backend.notice}"
    return text
