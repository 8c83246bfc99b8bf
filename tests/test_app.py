"""The whole app, served on loopback with the tiny local model, driven through gradio_client."""

from __future__ import annotations

import pytest
from gradio_client import Client

from chat.backends.local.backend import LocalBackend
from chat.config import Settings
from chat.conversation.backend import FINISH_CANCELLED
from chat.conversation.turns import strip_note
from chat.engine.build import Engine, load_model
from chat.engine.decoders import PlainDecoder
from tests.doubles import RecordingDecoder
from tests.helpers import serve_app

GREEDY = ("", 0.0, 40, 0.9, 1.0)  # system prompt, temperature, max new tokens, top-p, repetition penalty


def test_reply_streams_in_growing_prefixes(client):
    job = client.submit("Tell me about falcons.", "", 0.6, 400, 0.9, 1.0, api_name="/chat")
    outputs = list(job)
    final = job.result()
    assert len(outputs) >= 3  # updates arrive at most every MIN_UPDATE_INTERVAL_S
    assert all(final.startswith(text) for text in outputs)
    assert final == outputs[-1] and final


def first_reply(app_url, *args):
    """A reply's words in a new conversation (a Client keeps its conversation across calls)."""
    return strip_note(Client(app_url, verbose=False).predict(*args, api_name="/chat"))


def test_greedy_settings_through_the_api_are_deterministic(app_url):
    first = first_reply(app_url, "Plan a trip to Lisbon.", *GREEDY)
    second = first_reply(app_url, "Plan a trip to Lisbon.", *GREEDY)
    assert first == second and first


def test_a_client_keeps_its_conversation_across_calls(app_url):
    client = Client(app_url, verbose=False)
    client.predict("Plan a trip to Lisbon.", *GREEDY, api_name="/chat")
    follow_up = strip_note(client.predict("Plan a trip to Lisbon.", *GREEDY, api_name="/chat"))
    assert follow_up != first_reply(app_url, "Plan a trip to Lisbon.", *GREEDY)


def test_system_prompt_and_max_new_tokens_change_the_reply(app_url, local_backend):
    plain = first_reply(app_url, "Hello", "", 0.0, 40, 0.9, 1.0)
    with_system = first_reply(app_url, "Hello", "You are a pirate.", 0.0, 40, 0.9, 1.0)
    short = first_reply(app_url, "Hello", "", 0.0, 3, 0.9, 1.0)
    assert with_system != plain
    assert plain.startswith(short) and local_backend.count_tokens(short) <= 3 < local_backend.count_tokens(
        plain
    )


@pytest.mark.parametrize(
    "args, named",
    [
        (("hi", "", -1.0, 40, 0.9, 1.0), "temperature"),
        (("hi", "", 0.5, 0, 0.9, 1.0), "max_new_tokens"),
        (("hi", "", 0.5, 40, 1.5, 1.0), "top_p"),
        (("hi", "", 0.5, 40, 0.9, 3.0), "repetition_penalty"),
        (("hi", "", "warm", 40, 0.9, 1.0), "temperature"),
    ],
)
def test_bad_parameters_get_an_error_naming_them(client, args, named):
    with pytest.raises(Exception) as raised:
        client.predict(*args, api_name="/chat")
    assert named in str(raised.value)


def test_empty_and_oversized_messages_get_clear_errors(client):
    with pytest.raises(Exception, match="type a message"):
        client.predict("  \n ", *GREEDY, api_name="/chat")
    with pytest.raises(Exception, match="limit is 20,000"):
        client.predict("x" * 20_001, *GREEDY, api_name="/chat")


def test_prompt_that_cannot_fit_says_so(client):
    with pytest.raises(Exception, match="tokens long"):
        client.predict("word " * 3000, *GREEDY, api_name="/chat")


def test_api_cancel_stops_the_models_generation(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    decoder = RecordingDecoder(PlainDecoder(model, tokenizer), tokenizer)
    decoder.tokens_per_s = 50  # a real model's pace, so the reply is still running when cancelled
    backend = LocalBackend(
        Engine.of_model(model, tokenizer, context_length=2048, decoder=decoder), model_name="tiny"
    )
    with serve_app(backend, Settings()) as url:
        client = Client(url, verbose=False)
        job = client.submit("Please keep talking.", "", 0.0, 2000, 0.9, 1.0, api_name="/chat")
        for index, _ in enumerate(job):
            if index == 2:
                break
        job.cancel()
        generation = decoder.ended_generation(0)
    backend.close()
    assert generation.finish_reason == FINISH_CANCELLED
    assert generation.tokens < 2000 and generation.tokens_after_cancel <= 1


def test_chat_returns_the_reply_text_alone_and_its_figures_come_from_reply_stats(app_url, local_backend):
    client = Client(app_url, verbose=False)
    reply = client.predict("Hello", "", 0.0, 12, 0.9, 1.0, 42, api_name="/chat")
    assert reply == strip_note(reply) and reply.strip()
    assert "tokens" not in reply and "<sub>" not in reply  # no figures in the words
    assert len(local_backend.tokenizer(reply)["input_ids"]) <= 12
    stats = client.predict(api_name="/reply_stats")
    assert stats["generated_tokens"] == 12 and stats["finish_reason"] == "length"
    assert stats["seed"] is None  # greedy (temperature 0): the seed given changes nothing
    assert 0 < stats["time_to_first_token_s"] < stats["duration_s"]
    assert stats["prompt_tokens"] == local_backend.count_tokens("User: Hello\nFalcon:")


def test_the_same_seed_regenerates_the_same_reply(app_url):
    first = first_reply(app_url, "Tell me a story.", "", 1.0, 30, 0.95, 1.0, 7)
    second = first_reply(app_url, "Tell me a story.", "", 1.0, 30, 0.95, 1.0, 7)
    other = first_reply(app_url, "Tell me a story.", "", 1.0, 30, 0.95, 1.0, 8)
    assert first == second != other


def test_context_meter_tells_when_older_turns_were_left_out(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    backend = LocalBackend(Engine.of_model(model, tokenizer, context_length=160), model_name="tiny")
    with serve_app(backend, Settings()) as url:
        client = Client(url, verbose=False)
        dropped = []
        for turn in range(4):
            client.predict(f"Question {turn} about the sea", "", 0.0, 40, 0.9, 1.0, api_name="/chat")
            dropped.append(client.predict(api_name="/reply_stats")["dropped_turns"])
    backend.close()
    assert dropped[0] == 0 and dropped[-1] > 0


def test_completion_mode_continues_raw_text(app_url, local_backend):
    from chat.web.page import COMPLETION_PRESETS

    text, stop = COMPLETION_PRESETS["English to French"]
    client = Client(app_url, verbose=False)
    continuation = client.predict(text, 0.0, 20, 0.9, 1.0, None, stop, api_name="/complete")
    assert continuation and "\n" not in continuation
    unstopped = client.predict(text, 0.0, 20, 0.9, 1.0, None, "", api_name="/complete")
    assert unstopped.startswith(continuation) and len(unstopped) > len(continuation)


def test_app_py_says_where_the_page_is_and_offers_no_share_option(tiny_model_dir, monkeypatch, capsys):
    import gradio as gr

    import app
    from tests.helpers import free_port

    started = []
    monkeypatch.setattr(gr.Blocks, "block_thread", lambda demo: started.append(demo))
    app.main(["--model", str(tiny_model_dir), "--port", str(free_port())])
    started[0].close()
    printed = capsys.readouterr().out
    assert "Falcon Chat is running on http://127.0.0.1:" in printed
    assert "share=True" not in printed  # Gradio's hint named an option app.py does not have


def test_the_api_description_names_every_output(app_url):
    # /reply_stats' output used to be described as "value_43".
    named = Client(app_url, verbose=False).view_api(return_format="dict", print_info=False)["named_endpoints"]
    labels = [output["label"] for endpoint in named.values() for output in endpoint["returns"]]
    assert labels and not [label for label in labels if label.startswith("value_")]
