"""Server text made fit for one log line (chat.conversation.log_safety), on literal strings."""

from __future__ import annotations

import json

import pytest

from chat.conversation.log_safety import json_line, log_text, scrub_secrets


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("Authorization: Bearer abc.def-ghi_jkl", "abc.def-ghi_jkl"),
        ("token hf_AbCdEfGhIjKlMnOpQrStUv was refused", "hf_AbCdEfGhIjKlMnOpQrStUv"),
        ("key AKIAIOSFODNN7EXAMPLE in use", "AKIAIOSFODNN7EXAMPLE"),
        ('{"aws_secret_access_key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}', "wJalrXUtnFEMI"),
        ("GET http://user:pa55@tgi.internal:8080/generate failed", "pa55"),
        ("https://x.example/v1?api_key=s3cr3tvalue&model=falcon", "s3cr3tvalue"),
        ("openai key sk-proj-0123456789abcdefXYZ", "sk-proj-0123456789abcdefXYZ"),
        ("X-Amz-Signature=0123abcd4567ef&X-Amz-Date=1", "0123abcd4567ef"),
    ],
)
def test_secrets_are_scrubbed(text, secret):
    scrubbed = scrub_secrets(text)
    assert secret not in scrubbed and "***" in scrubbed


def test_what_is_not_a_secret_is_kept():
    text = "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 2048"
    assert scrub_secrets(text) == text


@pytest.mark.parametrize("breaker", ["\n", "\r", "\x85", "\u2028", "\u2029", "\x1b", "\u202e", "\x00"])
def test_every_line_breaker_is_escaped(breaker):
    text = log_text(f"one{breaker}two")
    assert breaker not in text and text.startswith("one\\") and text.endswith("two")


def test_long_text_is_trimmed_and_says_so():
    assert log_text("x" * 2000, limit=100) == "x" * 100 + "…[+1,900 characters]"


def test_text_that_repeats_the_conversation_is_withheld():
    message = "my bank account number is 12345678 and my password hunter2"
    echoed = f"validation failed for: {message[10:60]}"
    assert "withheld" in log_text(echoed, private=[message])
    assert log_text("CUDA out of memory", private=[message]) == "CUDA out of memory"
    assert log_text("model says hello", private=["hello"]) == "model says hello"  # too short to tell


def test_a_json_line_stays_one_line_in_every_reader_and_parses_back():
    record = {"message": "a\nb\u2028c\u2029d\x85e"}
    line = json_line(record)
    assert not any(c in line for c in "\n\u2028\u2029\x85")
    assert json.loads(line) == record
