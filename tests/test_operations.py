"""Operations: /healthz, /metrics in Prometheus format, and request logs without message text."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

from gradio_client import Client
from prometheus_client.parser import text_string_to_metric_families

from chat.backends.local.backend import LocalBackend
from chat.config import Settings
from chat.engine.build import Engine, load_model
from chat.web.export import conversation_json, conversation_markdown
from tests.helpers import serve_app


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def samples(metrics_text: str) -> dict:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
    }


def test_metrics_parse_and_count_a_request(app_url):
    before = samples(get(app_url + "metrics")[1])
    Client(app_url, verbose=False).predict("Hello", "", 0.0, 5, 0.9, 1.0, api_name="/chat")
    status, text = get(app_url + "metrics")
    after = samples(text)
    assert status == 200
    key = ("falcon_chat_requests_total", (("mode", "chat"), ("outcome", "length")))
    assert after[key] == before.get(key, 0) + 1
    tokens = ("falcon_chat_generated_tokens_total", ())
    assert after[tokens] == before.get(tokens, 0) + 5
    count = ("falcon_chat_time_to_first_token_seconds_count", ())
    assert after[count] == before.get(count, 0) + 1
    assert ("falcon_chat_queue_depth", ()) in after


def test_healthz_names_a_local_model_by_its_folder_not_its_whole_path(app_url, tiny_model_dir):
    # The app's own fixture backend: built by the factory from `--model <folder>`.
    status, body = get(app_url + "healthz")
    assert status == 200 and json.loads(body)["model"] == tiny_model_dir.name
    assert str(tiny_model_dir.parent) not in body


def test_healthz_flips_when_the_backend_is_down(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    backend = LocalBackend(Engine.of_model(model, tokenizer, context_length=2048), model_name="tiny")
    with serve_app(backend, Settings()) as url:
        status, body = get(url + "healthz")
        assert status == 200 and '"ok"' in body
        backend.close()  # the worker that owns the model ends
        backend._worker.join(10)
        status, body = get(url + "healthz")
        assert status == 503 and '"unavailable"' in body


def test_request_logs_have_figures_but_no_message_text_or_secrets(tiny_model_dir, caplog):
    model, tokenizer = load_model(str(tiny_model_dir))
    backend = LocalBackend(Engine.of_model(model, tokenizer, context_length=2048), model_name="tiny")
    secret = "hf_SENTINEL_do_not_log_0123456789"
    with (
        caplog.at_level(logging.INFO, logger="falcon_chat.requests"),
        serve_app(backend, Settings(token=secret)) as url,
    ):
        Client(url, verbose=False).predict("my private message", "", 0.0, 5, 0.9, 1.0, api_name="/chat")
    backend.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "falcon_chat.requests"]
    assert any('"generated_tokens": 5' in line and '"finish_reason": "length"' in line for line in lines)
    everything = caplog.text
    assert "my private message" not in everything and secret not in everything


def test_conversation_exports_keep_the_words_without_the_apps_notes():
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!\n\n<sub>📊 2 tokens · end of turn</sub>"},
        {"role": "user", "content": [{"type": "text", "text": "Bye"}]},
        {"role": "assistant", "content": "> ⚠️ The model server could not be reached."},
    ]
    markdown = conversation_markdown(
        history, system_prompt="Be kind.", model_name="tiiuae/falcon-7b-instruct"
    )
    assert "**System:** Be kind." in markdown and "**falcon-7b-instruct:** Hello!" in markdown
    assert "📊" not in markdown
    assert '"content": "Bye"' in conversation_json(history)


def test_an_export_names_the_replies_after_the_model_that_wrote_them():
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    markdown = conversation_markdown(history, model_name="SmolLM2-135M-Instruct")
    assert "**SmolLM2-135M-Instruct:** Hello!" in markdown and "Falcon:" not in markdown


def test_healthz_follows_a_remote_server(tmp_path):
    from chat.backends.remote.tgi import TGIBackend
    from tests.tgi_double import TGIDouble

    tgi = TGIDouble().start()
    backend = TGIBackend([tgi.url])
    with serve_app(backend, Settings()) as url:
        status, body = get(url + "healthz")
        assert status == 200 and '"ok"' in body
        tgi.stop()
        status, body = get(url + "healthz")
        assert status == 503 and '"unavailable"' in body
