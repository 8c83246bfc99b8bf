"""The page: a `gr.ChatInterface` over `stream_reply`, and how it is launched.

The UI never knows which backend it talks to. The API is the ChatInterface's `/chat`:
`client.predict(message, system_prompt, temperature, max_new_tokens, top_p, repetition_penalty,
api_name="/chat")`.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from .backends.base import Backend
from .config import Settings
from .embedding import embedding_launch_options
from .errors import ChatError
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
from .reply import stream_reply

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


def build_demo(backend: Backend, settings: Settings) -> gr.Blocks:
    """The chat page for `backend`."""
    defaults = settings.default_params

    def respond(message, history, system_prompt, temperature, max_new_tokens, top_p, repetition_penalty):
        try:
            params = GenerationParams.from_request(
                defaults,
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                top_p=top_p,
                repetition_penalty=repetition_penalty,
            )
            yield from stream_reply(
                backend,
                message,
                history,
                system_prompt if isinstance(system_prompt, str) else "",
                params,
                max_message_chars=settings.max_message_chars,
            )
        except ChatError as error:
            raise gr.Error(error.user_message, print_exception=False) from None

    additional_inputs = [
        gr.Textbox(settings.system_prompt, label="System prompt", lines=2, render=False),
        _slider(0.0, MAX_TEMPERATURE, 0.05, DEFAULT_TEMPERATURE, "Temperature", "0 = greedy"),
        _slider(
            1, min(backend.context_length(), 4096), 1, DEFAULT_MAX_NEW_TOKENS, "Max new tokens", ""
        ),
        _slider(0.01, 1.0, 0.01, DEFAULT_TOP_P, "Top-p", "1.0 = off"),
        _slider(
            MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY, 0.05, DEFAULT_REPETITION_PENALTY,
            "Repetition penalty", "1.0 = off",
        ),
    ]
    with gr.Blocks(title=TITLE, fill_height=True) as demo:
        gr.HTML(_banner(), elem_id="banner")
        gr.ChatInterface(
            respond,
            additional_inputs=additional_inputs,
            additional_inputs_accordion=gr.Accordion("System prompt and settings", open=False),
            description=_description(backend),
            examples=[[example] for example in EXAMPLES],
            cache_examples=False,  # Spaces would otherwise call the model at start-up
            editable=True,
            save_history=True,
            concurrency_limit=settings.concurrency_limit or backend.concurrency_limit,
            fill_height=True,
            api_name="chat",
        )
    return demo


def launch_options(settings: Settings) -> dict:
    """Keyword arguments for `demo.launch` (Gradio 6 takes theme and CSS here)."""
    return dict(
        server_name=settings.host,
        server_port=settings.port,
        css=(ASSETS / "style.css").read_text(encoding="utf-8"),
        theme=gr.themes.Soft(primary_hue="amber"),
        footer_links=["api", "gradio"],
        # Framed by other sites: storage fallback, and frame-ancestors when restricted.
        **embedding_launch_options(settings.allow_embed_from),
    )


def _slider(low, high, step, value, label, info) -> gr.Slider:
    slider = gr.Slider(low, high, value=value, step=step, label=label, info=info or None, render=False)
    # Gradio's own range check runs before our function and does not say which setting is wrong
    # ("Value -5 is less than minimum value 0."). GenerationParams checks the same ranges and names
    # the parameter, so the value is passed through as it came.
    slider.preprocess = lambda payload: payload
    return slider


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
