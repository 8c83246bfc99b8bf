"""The page: a chat tab (`gr.ChatInterface` over `stream_reply`), a completion tab, and launching.

The UI never knows which backend it talks to. API endpoints:
- `/chat`: `client.predict(message, system_prompt, temperature, max_new_tokens, top_p,
  repetition_penalty, seed, api_name="/chat")`; a Client keeps its conversation across calls;
- `/reply_stats`: the figures of this session's last reply, as JSON;
- `/complete`: `client.predict(text, temperature, max_new_tokens, top_p, repetition_penalty, seed,
  stop, api_name="/complete")`, raw continuation for base models.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from .backends.base import Backend
from .bridge import UpdatePacer, newest_in_thread
from .config import Settings
from .embedding import embedding_launch_options
from .errors import ChatError, InvalidParameter
from .export import conversation_json, conversation_markdown
from .gradio_costs import text_message, trim_gradio_costs
from .history import add_footer
from .operations import Operations
from .params import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_REPETITION_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    MAX_REPETITION_PENALTY,
    MAX_TEMPERATURE,
    MIN_REPETITION_PENALTY,
    GenerationParams,
)
from .reply import FINISH_WORDS, MIN_UPDATE_INTERVAL_S, ReplyStats, stream_completion, stream_reply

ASSETS = Path(__file__).resolve().parent.parent / "assets"
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
COMPLETION_STOPS = ("<|endoftext|>",)


def build_demo(backend: Backend, settings: Settings, operations: Operations | None = None) -> gr.Blocks:
    """The page for `backend`. `demo.operations` holds its metrics, logs and /healthz."""
    operations = operations or Operations(backend, log_messages=settings.log_messages)
    defaults = settings.default_params
    pacer = UpdatePacer(settings.page_updates, MIN_UPDATE_INTERVAL_S)

    def params_from(temperature, max_new_tokens, top_p, repetition_penalty, seed, stops=None):
        return GenerationParams.from_request(
            defaults,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=_seed(seed),
            stop_sequences=stops,
        )

    async def respond(
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
        finished: list[ReplyStats] = []

        def on_finish(stats: ReplyStats) -> None:
            finished.append(stats)
            operations.record_reply("chat", stats, message)
            if isinstance(session, dict):
                session["last_reply"] = stats.as_dict()

        def reply(cancelled) -> Iterator[str]:  # runs in the reply's own thread (chat.bridge)
            params = params_from(temperature, max_new_tokens, top_p, repetition_penalty, seed)
            return stream_reply(
                backend,
                message,
                history,
                system_prompt if isinstance(system_prompt, str) else "",
                params,
                max_message_chars=settings.max_message_chars,
                on_finish=on_finish,
                cancelled=cancelled.is_set,
            )

        operations.in_flight.inc()
        try:
            text = ""
            async for text in newest_in_thread(reply, pacer=pacer, name="chat-reply"):
                yield text
        except ChatError as error:
            operations.record_rejected("chat", type(error).__name__)
            raise gr.Error(error.user_message, print_exception=False) from None
        finally:
            operations.in_flight.dec()
        yield add_footer(text, stats_line(finished[-1]))

    async def complete(text, temperature, max_new_tokens, top_p, repetition_penalty, seed, stop):
        def reply(cancelled) -> Iterator[str]:
            stops = COMPLETION_STOPS + tuple(_parse_stops(stop))
            params = params_from(temperature, max_new_tokens, top_p, repetition_penalty, seed, stops)
            return stream_completion(
                backend,
                text,
                params,
                max_message_chars=settings.max_message_chars,
                on_finish=lambda stats: operations.record_reply("completion", stats, text),
                cancelled=cancelled.is_set,
            )

        try:
            async for continuation in newest_in_thread(reply, pacer=pacer, name="completion"):
                yield continuation
        except ChatError as error:
            operations.record_rejected("completion", type(error).__name__)
            raise gr.Error(error.user_message, print_exception=False) from None

    def export(history, system_prompt):
        folder = Path(tempfile.mkdtemp(prefix="falcon-chat-"))
        options = dict(system_prompt=system_prompt or "", model_name=backend.model_name)
        markdown, json_file = folder / "conversation.md", folder / "conversation.json"
        markdown.write_text(conversation_markdown(history, **options), encoding="utf-8")
        json_file.write_text(conversation_json(history, **options), encoding="utf-8")
        return gr.update(value=[str(markdown), str(json_file)], visible=True)

    max_tokens_limit = min(backend.context_length(), 4096)
    with gr.Blocks(title=TITLE, fill_height=True) as demo:
        session = gr.State({})
        gr.HTML(_banner(), elem_id="banner")
        with gr.Tab("Chat"):
            system_prompt = gr.Textbox(settings.system_prompt, label="System prompt", lines=2, render=False)
            chat = gr.ChatInterface(
                respond,
                additional_inputs=[
                    system_prompt,
                    *_settings_inputs(max_tokens_limit, render=False),
                    session,
                ],
                additional_inputs_accordion="System prompt and settings",
                description=_description(backend),
                examples=[[example] for example in EXAMPLES],
                cache_examples=False,  # Spaces would otherwise call the model at start-up
                editable=True,
                save_history=True,
                concurrency_limit=settings.concurrency_limit or backend.concurrency_limit,
                fill_height=True,
                api_name="chat",
            )
            # Through the API the message can be any JSON value; Gradio's ChatInterface fails on
            # anything but text (an AttributeError, shown as a bare "Error") before respond runs.
            chat.textbox.preprocess = text_message
            with gr.Row():
                export_button = gr.Button("⬇ Export conversation (Markdown, JSON)", size="sm")
            files = gr.File(label="Conversation files", file_count="multiple", visible=False)
            export_button.click(export, [chat.chatbot, system_prompt], files, api_visibility="private")
            stats_button = gr.Button(visible=False)
            stats_button.click(
                lambda state: (state or {}).get("last_reply"),
                session,
                gr.JSON(visible=False),
                api_name="reply_stats",
                queue=False,
            )
        with gr.Tab("Completion"):
            gr.Markdown("Raw text continuation, for base models (no chat format).")
            text = gr.Textbox(label="Text to continue", lines=8)
            preset = gr.Dropdown(list(COMPLETION_PRESETS), label="Few-shot presets", value=None)
            output = gr.Textbox(label="Continuation", lines=6, interactive=False)
            with gr.Row():
                generate_button = gr.Button("Generate", variant="primary")
                stop_button = gr.Button("Stop", variant="stop")
            with gr.Accordion("Settings", open=False):
                stop = gr.Textbox("", label="Stop at", info="comma-separated; \\n for a newline")
                completion_settings = _settings_inputs(max_tokens_limit, render=True)
            preset.change(
                lambda name: COMPLETION_PRESETS.get(name, ("", ""))[:2],
                preset,
                [text, stop],
                api_visibility="private",
            )
            generation = generate_button.click(
                complete,
                [text, *completion_settings, stop],
                output,
                api_name="complete",
                concurrency_limit=settings.concurrency_limit or backend.concurrency_limit,
            )
            stop_button.click(None, cancels=[generation])
    demo.operations = operations
    trim_gradio_costs(
        demo, raw_inputs=[system_prompt, *chat.additional_inputs, text, *completion_settings, stop]
    )
    # A full queue turns new requests away at once instead of letting them wait for minutes: the
    # page says "This application is currently busy. Please try again.", gradio_client raises
    # QueueError("Queue is full! Please try again."), the REST route answers HTTP 503.
    demo.queue(max_size=settings.queue_size)
    operations.watch_queue(demo)
    return demo


def stats_line(stats: ReplyStats) -> str:
    """The footer under a reply: tokens, time to first token, speed, why it ended, seed, context."""
    parts = [f"{stats.generated_tokens} tokens"]
    if stats.time_to_first_token_s is not None:
        parts.append(f"first token {stats.time_to_first_token_s:.2f} s")
    if stats.tokens_per_s:
        parts.append(f"{stats.tokens_per_s:.1f} tokens/s")
    parts.append(FINISH_WORDS.get(stats.finish_reason, stats.finish_reason))
    if stats.seed is not None:
        parts.append(f"seed {stats.seed}")
    if stats.context_length:
        used = stats.prompt_tokens + stats.generated_tokens
        parts.append(f"context {used:,}/{stats.context_length:,} ({100 * used / stats.context_length:.0f}%)")
    if stats.dropped_turns:
        turns = "turn" if stats.dropped_turns == 1 else "turns"
        parts.append(f"{stats.dropped_turns} older {turns} left out to fit")
    return " · ".join(parts)


def launch_options(settings: Settings, demo: gr.Blocks | None = None) -> dict:
    """Keyword arguments for `demo.launch` (Gradio 6 takes theme and CSS here)."""
    options = dict(
        server_name=settings.host,
        server_port=settings.port,
        css=(ASSETS / "style.css").read_text(encoding="utf-8"),
        theme=gr.themes.Soft(primary_hue="amber"),
        footer_links=["api", "gradio"],
        # Framed by other sites: storage fallback, and frame-ancestors when restricted.
        **embedding_launch_options(settings.allow_embed_from),
    )
    operations = getattr(demo, "operations", None)
    if operations is not None:  # /healthz and /metrics, served by Gradio's own FastAPI app
        app_kwargs = dict(options.get("app_kwargs") or {})
        app_kwargs["routes"] = [*app_kwargs.get("routes", []), *operations.routes()]
        options["app_kwargs"] = app_kwargs
        # Each running reply holds one of Gradio's worker threads while it waits for its next
        # token; with Gradio's default of 40, the 41st concurrent reply waits for a thread.
        concurrency = settings.concurrency_limit or operations.backend.concurrency_limit
        options["max_threads"] = max(40, 2 * concurrency + 8)  # chat and completion, plus the rest
    return options


def _settings_inputs(max_tokens_limit: int, *, render: bool) -> list:
    return [
        _slider(0.0, MAX_TEMPERATURE, 0.05, DEFAULT_TEMPERATURE, "Temperature", "0 = greedy", render),
        _slider(1, max_tokens_limit, 1, DEFAULT_MAX_NEW_TOKENS, "Max new tokens", "", render),
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


def _seed(raw):
    """The seed box's text (or an API number) as a seed; empty means a random one."""
    if isinstance(raw, str):
        raw = raw.strip()
        if not raw:
            return None
        try:
            return int(raw)
        except ValueError:
            raise InvalidParameter(f"seed must be a whole number or empty, not {raw[:20]!r}.") from None
    return raw


def _parse_stops(raw) -> list[str]:
    if not isinstance(raw, str) or not raw:
        return []
    return [s.replace("\\n", "\n") for s in raw.split(",") if s]


def _banner() -> str:
    return (ASSETS / "banner.svg").read_text(encoding="utf-8")


def _description(backend: Backend) -> str:
    text = f"Chatting with **{backend.model_name}** through {backend.name}."
    if "tiny demo" in backend.model_name:
        text += (
            "<br>⚠️ This is a tiny demo model with random weights, built offline so the app works "
            "anywhere: its replies are gibberish. Point the app at a real Falcon with "
            "`python app.py --model tiiuae/falcon-7b-instruct` or at a server with "
            "`--backend tgi --endpoint URL` (see the README)."
        )
    return text
