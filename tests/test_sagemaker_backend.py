"""The SageMaker backend through botocore's Stubber, with responses in the real event-stream shape:
AWS event-stream binary messages (prelude, headers, payload, CRCs) parsed by botocore's own
`EventStream`, whose `PayloadPart`s carry TGI's SSE bytes split at arbitrary places, as the
Hugging Face LLM container sends them."""

from __future__ import annotations

import json
import struct
from binascii import crc32

import boto3
import pytest
from botocore.eventstream import EventStream
from botocore.parsers import EventStreamJSONParser
from botocore.stub import Stubber

from chat.backends.remote.failover import RemoteOptions
from chat.backends.remote.sagemaker import SageMakerBackend
from chat.conversation.backend import FINISH_STOP
from chat.conversation.errors import BackendBusy, BackendUnavailable, ContextOverflow, GenerationFailed
from chat.conversation.params import GenerationParams
from chat.conversation.prompt import ServerTemplateFormat
from chat.conversation.reply import stream_reply

OPERATION = "invoke_endpoint_with_response_stream"
OPTIONS = RemoteOptions(first_token_timeout_s=5, token_timeout_s=5, busy_retries=1, backoff_s=0.01)


def event_message(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event-stream message, encoded as the service sends it."""
    encoded = b"".join(
        struct.pack(">B", len(name)) + name.encode() + struct.pack(">BH", 7, len(value)) + value.encode()
        for name, value in headers.items()
    )
    prelude = struct.pack(">II", 12 + len(encoded) + len(payload) + 4, len(encoded))
    message = prelude + struct.pack(">I", crc32(prelude)) + encoded + payload
    return message + struct.pack(">I", crc32(message))


def payload_part(data: bytes) -> bytes:
    return event_message(
        {":message-type": "event", ":event-type": "PayloadPart", ":content-type": "application/octet-stream"},
        data,
    )


def stream_error(code: str, message: str) -> bytes:
    return event_message(
        {":message-type": "exception", ":exception-type": code, ":content-type": "application/json"},
        json.dumps({"Message": message, "ErrorCode": "ModelStreamError"}).encode(),
    )


def tgi_sse(words: list[str], finish: str = "eos_token") -> bytes:
    lines = [
        "data:"
        + json.dumps(
            {
                "index": i,
                "token": {"id": i, "text": w, "logprob": -1.0, "special": False},
                "generated_text": None,
                "details": None,
            }
        )
        for i, w in enumerate(words)
    ]
    lines.append(
        "data:"
        + json.dumps(
            {
                "index": len(words),
                "token": {"id": 2, "text": "<|endoftext|>", "logprob": -0.1, "special": True},
                "generated_text": "".join(words),
                "details": {"finish_reason": finish, "generated_tokens": len(words) + 1, "seed": 7},
            }
        )
    )
    return "".join(line + "\n\n" for line in lines).encode()


class EventStreamStubber(Stubber):
    """botocore's Stubber checks an event-stream member of a response as a plain dict, so it
    refuses the `EventStream` object botocore itself returns there: check all but that member."""

    def _validate_operation_response(self, operation_name, service_response):
        checked = {**service_response, "Body": {"PayloadPart": {"Bytes": b""}}}
        super()._validate_operation_response(operation_name, checked)


class RawStream:
    """Stands in for the urllib3 response botocore reads: chunks, and close()."""

    def __init__(self, chunks):
        self.chunks = chunks
        self.closed = False

    def stream(self):
        yield from self.chunks

    def close(self):
        self.closed = True


@pytest.fixture
def client():
    return boto3.client(
        "sagemaker-runtime",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def body_for(client, *messages: bytes, chunk_size: int = 37) -> EventStream:
    data = b"".join(messages)
    raw = RawStream([data[i : i + chunk_size] for i in range(0, len(data), chunk_size)])
    shape = client.meta.service_model.operation_model("InvokeEndpointWithResponseStream").output_shape
    return EventStream(
        raw, shape.members["Body"], EventStreamJSONParser(), "InvokeEndpointWithResponseStream"
    )


def answer(stubber, client, *messages, endpoint="falcon-180b-chat", expected_payload=None):
    expected = {"EndpointName": endpoint, "Body": expected_payload, "ContentType": "application/json"}
    if expected_payload is None:
        from botocore.stub import ANY

        expected["Body"] = ANY
    body = body_for(client, *messages)
    stubber.add_response(OPERATION, {"Body": body, "ContentType": "application/json"}, expected)
    return body


def test_streams_tgi_tokens_out_of_payload_parts_split_anywhere(client):
    sse = tgi_sse([" Bonjour", " à", " tous", " ✓"])
    with EventStreamStubber(client) as stubber:
        # One PayloadPart per 5 bytes: lines, JSON and characters are cut everywhere.
        answer(stubber, client, *[payload_part(sse[i : i + 5]) for i in range(0, len(sse), 5)])
        tokens = list(
            SageMakerBackend(["falcon-180b-chat"], client=client, options=OPTIONS).stream(
                "User: Hi\nFalcon:", GenerationParams()
            )
        )
    assert "".join(t.text for t in tokens) == " Bonjour à tous ✓"
    assert tokens[-1].finish_reason == FINISH_STOP and tokens[-1].seed == 7


def test_sends_the_jumpstart_payload_without_nulls(client):
    # TGI (inside the container) rejects null for some parameters: they are left out, as for TGI.
    params = GenerationParams(temperature=0.0, max_new_tokens=64)
    expected = json.dumps(
        {
            "inputs": "User: Hi\nFalcon:",
            "parameters": {
                "do_sample": False,
                "max_new_tokens": 64,
                "stop": ["\nUser:", "\nFalcon:", "\nSystem:", "<|endoftext|>"],
                "details": True,
                "return_full_text": False,
            },
            "stream": True,
        }
    )
    with EventStreamStubber(client) as stubber:
        answer(stubber, client, payload_part(tgi_sse(["ok"])), expected_payload=expected)
        list(
            SageMakerBackend(["falcon-180b-chat"], client=client, options=OPTIONS).stream(
                "User: Hi\nFalcon:", params
            )
        )
        stubber.assert_no_pending_responses()


def test_a_stream_cut_before_tgis_final_event_is_a_failure_not_a_finished_reply(client):
    cut = tgi_sse([" Bonjour", " à"]).split(b"\n\n")
    without_final_event = b"\n\n".join(cut[:2]) + b"\n\n"
    with EventStreamStubber(client) as stubber:
        answer(stubber, client, payload_part(without_final_event))
        tokens = SageMakerBackend(["falcon-180b-chat"], client=client, options=OPTIONS).stream(
            "User: Hi\nFalcon:", GenerationParams()
        )
        with pytest.raises(GenerationFailed, match="broke off"):
            list(tokens)


def test_with_the_template_format_the_container_gets_a_chat_request(client):
    # A TGI container with MESSAGES_API_ENABLED=true takes chat on /invocations, streams chat chunks.
    chunks = [
        {"choices": [{"index": 0, "delta": {"content": w}, "finish_reason": f}]}
        for w, f in [(" Paris", None), (" it", None), (" is.", "stop")]
    ]
    sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks).encode() + b"data: [DONE]\n\n"
    sent = []
    client.meta.events.register(
        "provide-client-params.sagemaker-runtime.InvokeEndpointWithResponseStream",
        lambda params, **kwargs: sent.append(json.loads(params["Body"])),
    )
    with EventStreamStubber(client) as stubber:
        answer(stubber, client, payload_part(sse))
        backend = SageMakerBackend(
            ["falcon-180b-chat"], client=client, options=OPTIONS, prompt_format=ServerTemplateFormat()
        )
        text = list(
            stream_reply(backend, "Capital?", [], "Be brief.", GenerationParams(), max_message_chars=100)
        )
    assert text[-1] == "Paris it is."
    assert sent[0]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital?"},
    ]
    assert sent[0]["stream"] is True and "inputs" not in sent[0]


def test_the_reply_loop_shows_the_text_with_stop_sequences_removed(client):
    with EventStreamStubber(client) as stubber:
        answer(stubber, client, payload_part(tgi_sse([" Hello", " there", "\nUser:"], "stop_sequence")))
        backend = SageMakerBackend(["falcon-180b-chat"], client=client, options=OPTIONS)
        reply = list(stream_reply(backend, "Hi", [], "", GenerationParams(), max_message_chars=100))
    assert reply[-1] == "Hello there"


def test_closing_the_stream_closes_the_response_body(client):
    with EventStreamStubber(client) as stubber:
        body = answer(stubber, client, payload_part(tgi_sse(["a", "b", "c", "d"])))
        stream = SageMakerBackend(["falcon-180b-chat"], client=client, options=OPTIONS).stream(
            "x", GenerationParams()
        )
        next(stream)
        stream.close()
    assert body._raw_stream.closed


def test_a_model_stream_error_mid_stream_keeps_the_partial_reply(client):
    with EventStreamStubber(client) as stubber:
        first_event = tgi_sse(["Part", " two"]).split(b"\n\n")[0] + b"\n\n"
        answer(
            stubber, client, payload_part(first_event), stream_error("ModelStreamError", "CUDA out of memory")
        )
        backend = SageMakerBackend(["falcon-180b-chat"], client=client, options=OPTIONS)
        reply = list(stream_reply(backend, "Hi", [], "", GenerationParams(), max_message_chars=100))
    assert reply[-1].startswith("Part") and GenerationFailed.user_message in reply[-1]
    assert "CUDA" not in reply[-1]


@pytest.mark.parametrize(
    "code, status, fields, kind",
    [
        ("ThrottlingException", 400, {}, BackendBusy),
        (
            "ModelError",
            424,
            {"OriginalStatusCode": 429, "OriginalMessage": "Model is overloaded"},
            BackendBusy,
        ),
        (
            "ModelError",
            424,
            {
                "OriginalStatusCode": 422,
                "OriginalMessage": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 2048",
            },
            ContextOverflow,
        ),
        ("ValidationError", 400, {}, BackendUnavailable),
        ("ServiceUnavailable", 503, {}, BackendUnavailable),
    ],
)
def test_service_errors_become_error_kinds(client, code, status, fields, kind):
    message = "Endpoint falcon-180b-chat of account 123 not found." if code == "ValidationError" else "failed"
    with EventStreamStubber(client) as stubber:
        for _ in range(2):  # a busy endpoint is asked twice (busy_retries=1)
            stubber.add_client_error(
                OPERATION,
                service_error_code=code,
                service_message=message,
                http_status_code=status,
                modeled_fields=fields or None,
            )
        with pytest.raises(kind):
            list(
                SageMakerBackend(["falcon-180b-chat"], client=client, options=OPTIONS).stream(
                    "x", GenerationParams()
                )
            )


def test_a_failing_endpoint_is_skipped_for_the_next_one(client):
    with EventStreamStubber(client) as stubber:
        stubber.add_client_error(OPERATION, service_error_code="ServiceUnavailable", http_status_code=503)
        answer(stubber, client, payload_part(tgi_sse(["from", " b"])), endpoint="falcon-b")
        backend = SageMakerBackend(["falcon-a", "falcon-b"], client=client, options=OPTIONS)
        assert "".join(t.text for t in backend.stream("x", GenerationParams())) == "from b"
        stubber.assert_no_pending_responses()


def test_without_a_tokenizer_counts_are_safe_and_the_context_is_configured(client):
    backend = SageMakerBackend(["e"], client=client, options=OPTIONS, max_total_tokens=1024)
    assert backend.context_length() == 1024
    assert backend.count_tokens("Grüße") >= 5
