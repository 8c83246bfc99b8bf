"""The shared remote machinery: endpoint rotation and cooldown, failover, busy retries, the
watchdog, and error mapping, driven by scripted streams (no HTTP)."""

from __future__ import annotations

import threading

import pytest

from chat.backends.remote.failover import (
    EndpointPool,
    RemoteOptions,
    Watchdog,
    error_for_exception,
    error_for_status,
    failover_stream,
)
from chat.conversation.backend import Token
from chat.conversation.errors import (
    BackendBusy,
    BackendTimeout,
    BackendUnavailable,
    ContextOverflow,
    GenerationFailed,
    RequestRejected,
)

FAST = RemoteOptions(first_token_timeout_s=5, token_timeout_s=5, busy_retries=2, backoff_s=0.25)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_endpoints_take_turns():
    pool = EndpointPool(["a", "b", "c"], cooldown_s=30)
    assert [pool.order()[0] for _ in range(4)] == ["a", "b", "c", "a"]


def test_a_failed_endpoint_is_tried_last_until_its_cooldown_ends():
    clock = Clock()
    pool = EndpointPool(["a", "b"], cooldown_s=30, clock=clock)
    pool.failed("a")
    assert [pool.order() for _ in range(2)] == [["b", "a"], ["b", "a"]]
    clock.now += 31
    assert pool.order() == ["a", "b"]


class Scripted:
    """open_stream for failover_stream: per endpoint, an error to raise or texts to yield."""

    def __init__(self, **plans):
        self.plans = {endpoint: list(plan) for endpoint, plan in plans.items()}
        self.opened: list[str] = []
        self.closed: list[str] = []

    def __call__(self, endpoint, watchdog):
        self.opened.append(endpoint)
        return self._stream(endpoint, self.plans[endpoint].pop(0))

    def _stream(self, endpoint, step):
        try:
            if isinstance(step, Exception):
                raise step
            for text in step:
                if isinstance(text, Exception):
                    raise text
                yield Token(text)
        finally:
            self.closed.append(endpoint)


def collect(stream):
    return [token.text for token in stream]


def test_an_endpoint_that_refuses_is_skipped_and_the_next_one_answers():
    opened = Scripted(a=[BackendUnavailable(), ["x"]], b=[["Hi", "!"]])
    pool = EndpointPool(["a", "b"], cooldown_s=30)
    assert collect(failover_stream(pool, FAST, opened)) == ["Hi", "!"]
    assert opened.opened == ["a", "b"] and pool.order() == ["b", "a"]  # a is cooling down


def test_busy_servers_are_retried_with_growing_backoff_then_reported_busy():
    waits = []
    opened = Scripted(a=[BackendBusy()] * 3)
    with pytest.raises(BackendBusy):
        collect(failover_stream(EndpointPool(["a"], 30), FAST, opened, sleep=waits.append))
    assert waits == [0.25, 0.5] and len(opened.opened) == 3


def test_a_busy_server_that_frees_up_answers_after_backoff():
    waits = []
    opened = Scripted(a=[BackendBusy(), ["ok"]])
    assert collect(failover_stream(EndpointPool(["a"], 30), FAST, opened, sleep=waits.append)) == ["ok"]
    assert waits == [0.25]


def test_when_every_endpoint_is_down_the_user_hears_at_once():
    waits = []
    opened = Scripted(a=[BackendUnavailable()], b=[BackendUnavailable()])
    with pytest.raises(BackendUnavailable):
        collect(failover_stream(EndpointPool(["a", "b"], 30), FAST, opened, sleep=waits.append))
    assert waits == []


@pytest.mark.parametrize("error", [ContextOverflow(), RequestRejected()])
def test_request_errors_are_not_retried_elsewhere(error):
    opened = Scripted(a=[error], b=[["x"]])
    with pytest.raises(type(error)):
        collect(failover_stream(EndpointPool(["a", "b"], 30), FAST, opened))
    assert opened.opened == ["a"]


def test_nothing_is_retried_after_the_first_token():
    opened = Scripted(a=[["Hel", GenerationFailed()]], b=[["other"]])
    stream = failover_stream(EndpointPool(["a", "b"], 30), FAST, opened)
    assert next(stream).text == "Hel"
    with pytest.raises(GenerationFailed):
        next(stream)
    assert opened.opened == ["a"]


def test_closing_the_stream_closes_the_endpoint_stream():
    opened = Scripted(a=[["a", "b", "c"]])
    stream = failover_stream(EndpointPool(["a"], 30), FAST, opened)
    next(stream)
    stream.close()
    assert opened.closed == ["a"]


def test_the_watchdog_aborts_once_its_deadline_passes_and_not_while_armed():
    aborted = threading.Event()
    watchdog = Watchdog(0.2)
    watchdog.on_expiry(aborted.set)
    assert aborted.wait(5) and watchdog.expired
    calm = Watchdog(60)
    calm.on_expiry(aborted.clear)
    calm.arm(60)
    calm.stop()
    assert aborted.is_set() and not calm.expired


@pytest.mark.parametrize(
    "status, message, kind",
    [
        (429, "Model is overloaded", BackendBusy),
        (422, "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 2048", ContextOverflow),
        (
            400,
            "This model's maximum context length is 2048 tokens. However, you requested 2100",
            ContextOverflow,
        ),
        (400, "'max_tokens' or 'max_completion_tokens' is too large: 3000", ContextOverflow),
        (422, "Input validation error: `top_p` must be > 0.0 and < 1.0", RequestRejected),
        (503, "Service Unavailable", BackendUnavailable),
        (500, "Internal Server Error", GenerationFailed),
        (401, "Unauthorized", BackendUnavailable),
    ],
)
def test_http_statuses_become_error_kinds(status, message, kind):
    error = error_for_status(status, message)
    assert type(error) is kind
    assert message not in error.user_message


def test_server_errors_before_the_first_token_may_be_tried_elsewhere():
    assert error_for_status(500).retryable and error_for_status(502).retryable
    assert not error_for_status(422, "bad").retryable


def test_transport_failures_become_error_kinds():
    import httpx2

    assert isinstance(error_for_exception(httpx2.ConnectError("refused")), BackendUnavailable)
    assert isinstance(error_for_exception(ConnectionRefusedError()), BackendUnavailable)
    assert isinstance(error_for_exception(httpx2.ReadTimeout("slow")), BackendTimeout)
    broken = error_for_exception(httpx2.RemoteProtocolError("peer closed connection"))
    assert isinstance(broken, GenerationFailed) and "broke off" in broken.user_message


def test_options_come_from_the_configuration():
    from chat.config import load_settings

    settings = load_settings(
        [
            "--backend",
            "tgi",
            "--endpoint",
            "http://a",
            "--connect-timeout",
            "2",
            "--first-token-timeout",
            "30",
            "--token-timeout",
            "7.5",
            "--busy-retries",
            "0",
            "--endpoint-cooldown",
            "9",
        ],
        environ={},
    )
    from chat.factory import remote_options

    options = remote_options(settings)
    assert (options.connect_timeout_s, options.first_token_timeout_s, options.token_timeout_s) == (2, 30, 7.5)
    assert (options.busy_retries, options.cooldown_s) == (0, 9)


def test_bad_timeouts_stop_the_start_with_one_line():
    from chat.config import load_settings
    from chat.conversation.errors import ConfigError

    with pytest.raises(ConfigError, match="--token-timeout"):
        load_settings(["--token-timeout", "soon"], environ={})
    with pytest.raises(ConfigError, match="FIRST|--first-token-timeout"):
        load_settings([], environ={"FIRST_TOKEN_TIMEOUT": "-1"})


def test_connect_and_read_timeouts_reach_the_http_clients(monkeypatch):
    from chat.backends.remote.base import http_timeout
    from chat.backends.remote.sagemaker import sagemaker_client

    options = RemoteOptions(connect_timeout_s=2, first_token_timeout_s=40, token_timeout_s=7)
    timeout = http_timeout(options)
    # The socket read timeout is a backstop above both token timeouts; the watchdog is precise.
    assert timeout.connect == 2 and timeout.read == 41
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    config = sagemaker_client(options).meta.config
    assert (config.connect_timeout, config.read_timeout) == (2, 41)
    assert config.retries["total_max_attempts"] == 1  # failover_stream retries, not botocore


def test_sagemaker_without_a_region_stops_the_start_with_one_line(monkeypatch, tmp_path):
    from chat.backends.remote.sagemaker import sagemaker_client
    from chat.conversation.errors import ConfigError

    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="AWS_REGION"):
        sagemaker_client(RemoteOptions())
