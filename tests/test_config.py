"""Configuration: flags, environment variables, and one clear line for a bad value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chat.config import load_settings
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
        (["--backend", "nope"], "invalid choice"),
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


def test_bad_configuration_stops_the_app_with_one_line():
    result = subprocess.run(
        [sys.executable, "app.py", "--port", "abc"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == ["app.py: error: --port must be a whole number, not 'abc'"]


def test_quantization_without_cuda_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "app.py", "--quantize", "4bit", "--model", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("app.py: error: --quantize 4bit needs")
