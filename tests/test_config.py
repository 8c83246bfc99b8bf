"""Configuration: flags, environment variables, and one clear line for a bad value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chat.config import FLAGS, Settings, flag_table, load_settings, parser
from chat.conversation.errors import ConfigError
from chat.conversation.params import DEFAULT_STOP_SEQUENCES

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_work_offline_with_the_demo_model():
    settings = load_settings([], environ={})
    assert settings.backend == "local" and settings.model is None
    assert (settings.host, settings.port) == ("127.0.0.1", 7860)
    assert settings.stop_sequences == DEFAULT_STOP_SEQUENCES


def test_environment_is_read_and_flags_win():
    environ = {
        "MODEL_ID": "tiiuae/falcon-7b-instruct",
        "GRADIO_SERVER_PORT": "9000",
        "STOP_SEQUENCES": "\\nUser:,###",
    }
    settings = load_settings(["--port", "9001"], environ=environ)
    assert settings.model == "tiiuae/falcon-7b-instruct" and settings.port == 9001
    assert settings.stop_sequences == ("\nUser:", "###")


@pytest.mark.parametrize(
    "argv, environ",
    [
        (["--stop", "\\nUser:", "--stop", "Utilisateur é:", "--stop", "用户:"], {}),
        ([], {"STOP_SEQUENCES": "\\nUser:,Utilisateur é:,用户:"}),
    ],
    ids=["flags", "environment"],
)
def test_stop_escapes_decode_and_other_characters_stay_as_typed(argv, environ):
    # One rule for the flag and the variable: `\n` is a newline, accents and CJK are untouched.
    settings = load_settings(argv, environ=environ)
    assert settings.stop_sequences == ("\nUser:", "Utilisateur é:", "用户:")


def test_stop_escapes_for_tab_unicode_comma_and_backslash():
    environ = {"STOP_SEQUENCES": "a\\tb,\\u00e9\\,x,back\\\\slash,C:\\dir"}
    assert load_settings([], environ=environ).stop_sequences == ("a\tb", "é,x", "back\\slash", "C:\\dir")


def test_the_limits_per_client_come_from_flags_or_the_environment():
    settings = load_settings(
        ["--request-timeout", "12.5", "--connections-per-client", "0"], environ={"REQUESTS_PER_SECOND": "7"}
    )
    assert (settings.request_timeout_s, settings.connections_per_client, settings.requests_per_second) == (
        12.5,
        0,
        7,
    )


def test_secrets_stay_out_of_the_settings_repr():
    settings = load_settings(["--token", "hf_sentinel_secret"], environ={})
    assert settings.token == "hf_sentinel_secret" and "hf_sentinel_secret" not in repr(settings)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--port", "abc"], "--port must be a whole number"),
        (["--backend", "nope"], "--backend must be one of local, tgi, openai, sagemaker, not 'nope'"),
        (["--backend", "tgi"], "needs --endpoint"),
        (["--max-total-tokens", "-5"], "--max-total-tokens must be between"),
        (["--prompt-format", "chatml"], "--prompt-format must be one of falcon, template, auto"),
        (["--request-timeout", "0"], "--request-timeout must be more than 0"),
        (["--requests-per-second", "many"], "--requests-per-second must be a whole number"),
    ],
)
def test_bad_configuration_is_one_clear_error(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(argv, environ={})


# A value each flag takes, as a person would type it; a new flag must add one here.
SAMPLES = {
    "--backend": "openai",
    "--model": "tiiuae/falcon-7b-instruct",
    "--endpoint": "http://a:1",
    "--host": "0.0.0.0",
    "--port": "9000",
    "--system-prompt": "Be brief.",
    "--quantize": "int4",
    "--save-quantized": "/tmp/int4",
    "--decoder": "fast",
    "--tensor-parallel": "auto",
    "--speculate": "ngram",
    "--draft-model": "/models/small",
    "--prompt-format": "template",
    "--max-total-tokens": "4096",
    "--stop": "###",
    "--max-message-chars": "500",
    "--concurrency": "4",
    "--queue-size": "10",
    "--page-updates": "50",
    "--token": "hf_x",
    "--api-key": "sk-x",
    "--connect-timeout": "2.5",
    "--first-token-timeout": "60",
    "--token-timeout": "5",
    "--busy-retries": "0",
    "--endpoint-cooldown": "3",
    "--log-messages": None,  # a switch: the flag alone, or the variable set to 1
    "--allow-embed-from": "https://a.example",
    "--max-request-bytes": "4096",
    "--request-timeout": "12.5",
    "--connections-per-client": "5",
    "--requests-per-second": "7",
}


@pytest.mark.parametrize("flag", FLAGS, ids=lambda flag: flag.name)
def test_each_flag_and_its_variable_set_the_same_setting(flag):
    assert set(SAMPLES) == {f.name for f in FLAGS}
    raw = SAMPLES[flag.name]
    # What the sample needs beside it to be a whole configuration.
    needs = {"--backend": ["--endpoint", "http://a:1"], "--save-quantized": ["--quantize", "int4"]}
    needs["--endpoint"] = ["--backend", "tgi"]
    needs["--draft-model"] = ["--speculate", "draft"]
    argv = [flag.name] + ([] if raw is None else [raw])
    from_flag = load_settings(argv + needs.get(flag.name, []), environ={})
    from_variable = load_settings(needs.get(flag.name, []), environ={flag.env: raw or "1"})
    assert from_flag == from_variable != Settings()


def test_help_shows_every_default_every_choice_and_every_variable():
    shown = " ".join(parser().format_help().split())  # argparse wraps lines anywhere
    for flag in FLAGS:
        assert f"env {flag.env})" in shown, flag.name
        if flag.choices:
            assert f"{flag.name} {{{','.join(flag.choices)}}}" in shown, flag.name
    assert "--decoder {auto,plain,fast}" in shown and "(default: auto; env DECODER)" in shown
    # --stop says which defaults it replaces.
    assert "(default: \\nUser:, \\nFalcon:, \\nSystem:, <|endoftext|>; env STOP_SEQUENCES)" in shown


def test_the_readmes_configuration_table_is_the_one_the_flags_make():
    # Regenerate with `python -m chat.config` after changing a flag.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert flag_table() in readme


def test_the_remote_defaults_are_the_backends_own():
    from chat.backends.remote.failover import RemoteOptions
    from chat.factory import remote_options

    assert remote_options(Settings()) == RemoteOptions()


def test_bad_configuration_stops_the_app_with_one_line():
    result = subprocess.run(
        [sys.executable, "app.py", "--port", "abc"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == ["app.py: error: --port must be a whole number, not 'abc'"]


def test_quantization_without_cuda_is_a_clear_error(tiny_model_dir):
    result = subprocess.run(
        [sys.executable, "app.py", "--quantize", "4bit", "--model", str(tiny_model_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("app.py: error: --quantize 4bit needs")
