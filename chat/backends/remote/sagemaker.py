"""SageMaker backend: a SageMaker endpoint running Hugging Face's LLM container (TGI inside).

Seeded for JumpStart's `huggingface-llm-falcon-180b-chat-bf16`: the request is TGI's payload
(`{"inputs", "parameters", "stream": true}`), streamed with `invoke_endpoint_with_response_stream`.
The answer is an AWS event stream whose `PayloadPart` events carry TGI's own SSE bytes, split at
arbitrary places, so `tgi_events.LineBuffer` rebuilds the lines. Region and credentials come from
the usual AWS environment (AWS_REGION, AWS_PROFILE, instance roles...), read by boto3 itself.

With `--prompt-format template` the payload is a chat request (`{"messages", "stream": true, ...}`)
instead: Hugging Face's TGI containers started with `MESSAGES_API_ENABLED=true` take it on the
same /invocations route, apply the model's chat template and stream chat-completion chunks; others
(JumpStart's Falcon-180B endpoint as deployed) expect text, so `falcon` stays the default.

SageMaker has no /info or /tokenize: the context is --max-total-tokens (else 2,048) and counts
are the safe over-estimate; a length error from the container still makes the reply loop drop
older turns. botocore's own retries are off: `failover.failover_stream` retries for every backend.
"""

from __future__ import annotations

import json
import socket

from chat.backends.remote.base import RemoteBackend
from chat.backends.remote.chat_events import chat_request, tokens_from_chat_lines
from chat.backends.remote.failover import (
    RemoteOptions,
    error_for_event,
    error_for_exception,
    error_for_status,
)
from chat.backends.remote.tgi_events import LineBuffer, generate_request, tokens_from_lines
from chat.conversation.errors import BackendError, BackendUnavailable, ConfigError
from chat.conversation.prompt import ChatMessages

_STATUS_OF_CODE = {"ThrottlingException": 429, "ServiceUnavailable": 503, "InternalFailure": 500}


def sagemaker_client(options: RemoteOptions):
    import boto3
    from botocore.config import Config
    from botocore.exceptions import NoRegionError

    config = Config(
        connect_timeout=options.connect_timeout_s,
        read_timeout=options.read_timeout_s,
        retries={"total_max_attempts": 1},
    )
    try:
        return boto3.client("sagemaker-runtime", config=config)
    except NoRegionError:
        raise ConfigError(
            "--backend sagemaker needs an AWS region: set AWS_REGION (or AWS_DEFAULT_REGION, or "
            "a region in the AWS profile)"
        ) from None


def error_for_client_error(error) -> BackendError:
    """A botocore ClientError (raised before the stream, or as an event-stream error) by kind."""
    response = getattr(error, "response", {}) or {}
    details = response.get("Error", {})
    code, message = details.get("Code", ""), details.get("Message", "")
    if code in ("ModelStreamError", "InternalStreamFailure"):
        return error_for_event("generation", f"{code}: {message}")
    if code == "ModelError":  # the container answered an error: judge it by its own status
        status = int(response.get("OriginalStatusCode") or 500)
        return error_for_status(status, response.get("OriginalMessage") or message)
    if code == "ValidationError" and "not found" in message.lower():
        return BackendUnavailable(detail=f"{code}: {message}")  # no such endpoint (here)
    status = _STATUS_OF_CODE.get(code) or response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 500
    return error_for_status(int(status), f"{code}: {message}")


def event_stream_lines(body):
    """The text lines of TGI's SSE inside an AWS event stream's `PayloadPart` events."""
    lines = LineBuffer()
    for event in body:
        yield from lines.feed(event.get("PayloadPart", {}).get("Bytes", b""))
    yield from lines.finish()


def shutdown_event_stream(body) -> None:
    """Interrupt a read blocked on a botocore event stream (its urllib3 connection's socket)."""
    raw = getattr(body, "_raw_stream", None)
    sock = getattr(getattr(raw, "_connection", None), "sock", None)
    if isinstance(sock, socket.socket):
        sock.shutdown(socket.SHUT_RDWR)
    else:
        body.close()


class SageMakerBackend(RemoteBackend):
    """Streams from one or more SageMaker endpoints (`--endpoint NAME`, repeatable)."""

    def __init__(
        self,
        endpoints,
        *,
        client=None,
        options=RemoteOptions(),
        concurrency_limit=64,
        max_total_tokens=None,
        model_name=None,
        prompt_format=None,
    ):
        super().__init__(
            endpoints,
            options=options,
            concurrency_limit=concurrency_limit,
            max_total_tokens=max_total_tokens,
            prompt_format=prompt_format,
        )
        self._client = client or sagemaker_client(options)
        self.model_name = model_name or "Falcon-180B chat"
        self.name = "Amazon SageMaker"

    def open_stream(self, endpoint, prompt, params, watchdog):
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(prompt, ChatMessages):  # the Messages API, where the container enables it
            payload, read = chat_request(prompt, params), tokens_from_chat_lines
        else:
            payload, read = generate_request(prompt, params), tokens_from_lines
        body = None
        try:
            response = self._client.invoke_endpoint_with_response_stream(
                EndpointName=endpoint, Body=json.dumps(payload), ContentType="application/json"
            )
            body = response["Body"]
            watchdog.on_expiry(lambda: shutdown_event_stream(body))
            yield from read(event_stream_lines(body))
        except BackendError:
            raise
        except ClientError as error:  # includes EventStreamError, raised mid-stream
            raise error_for_client_error(error) from None
        except (BotoCoreError, OSError) as error:
            raise error_for_exception(error) from None
        finally:
            if body is not None:
                body.close()
