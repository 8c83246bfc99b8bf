"""Server text made fit for one log line (chat.conversation.log_safety), on literal strings, and
every log record of the process made safe as it is created."""

from __future__ import annotations

import json
import logging

import pytest

from chat.conversation.errors import GenerationFailed
from chat.conversation.log_safety import (
    RepeatLimit,
    install,
    json_line,
    log_text,
    private_texts,
    scrub_secrets,
)


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


# -- every record of the process, whoever makes it ---------------------------------------------

MESSAGE = "my account number is 12345678 and my password is hunter2, please help"
FORGED = 'oops\n2026-11-25 10:00:00 INFO falcon_chat.requests: {"event": "reply", "forged": true}'


@pytest.fixture
def safe_logs(caplog):
    install(log_messages=False)
    caplog.set_level(logging.DEBUG)
    return caplog


def test_a_librarys_records_lose_credentials_and_stay_one_line(safe_logs):
    logging.getLogger("httpx2").info(
        'HTTP Request: %s %s "%s"', "POST", "http://alice:pa55word@tgi:80/x", "200"
    )
    logging.getLogger("some.library").warning(
        "answer: %s", f"Authorization=Bearer hf_AbCdEfGhIjKl0123 {FORGED}"
    )
    try:
        raise ValueError(f"Basic YWxpY2U6cGE1NXdvcmQ= refused\n{FORGED}")
    except ValueError:
        logging.getLogger("another.library").exception("request failed")
    texts = [record.getMessage() for record in safe_logs.records]
    assert len(texts) == 3
    for secret in ("pa55word", "hf_AbCdEfGhIjKl0123", "YWxpY2U6cGE1NXdvcmQ="):
        assert secret not in safe_logs.text
    assert "\n" not in "".join(texts) and "***@tgi" in texts[0]
    assert "Traceback" in texts[2] and "ValueError" in texts[2]  # folded into the one line


def test_a_record_made_during_a_reply_withholds_what_repeats_its_conversation(safe_logs):
    log = logging.getLogger("falcon_chat.test")
    with private_texts([MESSAGE]):
        log.warning(
            "endpoint %s failed: %s", "http://tgi:80", f"HTTP 500: cannot serve input {MESSAGE[5:60]}"
        )
        log.warning("no token within the timeout")
    log.warning("after the reply: %s", MESSAGE)  # outside a reply: nothing to compare with
    first, second, third = (record.getMessage() for record in safe_logs.records)
    assert "withheld" in first and "http://tgi:80" in first and "hunter2" not in first
    assert second == "no token within the timeout"  # words are not secrets
    assert "hunter2" in third


def test_with_log_messages_a_reply_may_repeat_its_conversation(safe_logs):
    install(log_messages=True)
    try:
        with private_texts([MESSAGE]):
            logging.getLogger("falcon_chat.test").warning("echo: %s", MESSAGE)
    finally:
        install(log_messages=False)
    assert "hunter2" in safe_logs.records[0].getMessage()


def test_an_errors_text_is_built_from_its_scrubbed_detail():
    error = GenerationFailed(detail=f"HTTP 500: Authorization=Bearer hf_AbCdEfGhIjKl0123 {FORGED}")
    assert "hf_AbCdEfGhIjKl0123" not in str(error) and "\n" not in str(error)


def test_one_kind_of_record_is_limited_and_the_next_one_says_how_many_were_not_logged():
    now = [0.0]
    limit = RepeatLimit(burst=3, window_s=60, clock=lambda: now[0])

    def record(message="accept failed: %s"):
        made = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, ("EMFILE",), None)
        made.template = message
        return made

    passed = [limit.filter(record()) for _ in range(1000)]
    assert passed.count(True) == 3
    assert limit.filter(record("another kind: %s"))  # other kinds are not held back
    now[0] = 61.0
    later = record()
    assert limit.filter(later) and "997 more like this were not logged" in later.getMessage()
