"""TGI backend: Text Generation Inference's `/generate_stream`, spoken directly over httpx.

The request is TGI's `{"inputs", "parameters": {..., "details": true}, "stream": true}`; the
answer is server-sent events, read by `tgi_events.tokens_from_lines`, as the SageMaker
backend uses (huggingface_hub's `InferenceClient` speaks the same protocol, but builds and
deep-copies dataclasses for every token: about 0.3 ms of CPU per token, a third of this app's
CPU time with 64 streams; docs/reliability.md). Requests go through the backend's one
`httpx2.Client` (so not through huggingface_hub's session, whose offline switch would refuse
even a TGI on loopback), carry `Authorization` only when a token is configured, and are closed
when the stream is: closing the connection is how TGI learns to stop generating. HTTP errors and
error events become our error kinds. Prompt budgets come from the server: GET /info for the
context and the input limit, POST /tokenize for counts.
"""

from __future__ import annotations

import logging

import httpx2

from chat.backends.remote.base import RemoteBackend, error_text
from chat.backends.remote.chat_events import chat_request, tokens_from_chat_lines
from chat.backends.remote.failover import (
    RemoteOptions,
    error_for_exception,
    error_for_status,
    shutdown_response,
)
from chat.backends.remote.tgi_events import generate_request, tokens_from_lines
from chat.conversation.errors import BackendError
from chat.conversation.prompt import ChatMessages

log = logging.getLogger(__name__)


class TGIBackend(RemoteBackend):
    """Streams from one or more TGI servers (or Inference Endpoints running TGI)."""

    def __init__(
        self,
        endpoints,
        *,
        token=None,
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
            token=token,
            prompt_format=prompt_format,
        )
        self.model_name = model_name or "Falcon"
        self.name = "Text Generation Inference"

    def open_stream(self, endpoint, prompt, params, watchdog):
        # A connection of its own, closed with the stream (which is how TGI hears of a Stop), and
        # never a kept-alive one that the server may be closing at that moment (a request sent
        # into it fails before the first token).
        if isinstance(prompt, ChatMessages):  # the Messages API: TGI applies the model's template
            route, body, read = "/v1/chat/completions", chat_request(prompt, params), tokens_from_chat_lines
        else:
            route, body, read = "/generate_stream", generate_request(prompt, params), tokens_from_lines
        request = self._http.stream("POST", endpoint + route, json=body, headers={"Connection": "close"})
        try:
            with request as response:
                watchdog.on_expiry(lambda: shutdown_response(response))
                if response.status_code >= 400:
                    response.read()
                    raise error_for_status(response.status_code, error_text(response))
                yield from read(response.iter_lines())
        except BackendError:
            raise
        except (httpx2.HTTPError, OSError) as error:
            raise error_for_exception(error) from None

    def health_url(self, endpoint):
        return f"{endpoint}/health"

    def server_context_length(self, endpoint):
        server = self.get_json("GET", f"{endpoint}/info") or {}
        if self.model_name == "Falcon" and server.get("model_id"):
            self.model_name = server["model_id"]
        # The prompt's own limit (`max_input_length` before TGI 2.0): often half the context, and a
        # prompt over it is refused even when prompt + reply would fit.
        max_input = server.get("max_input_tokens") or server.get("max_input_length")
        if max_input:
            self._server_input_limit = int(max_input)
        total = server.get("max_total_tokens")
        return int(total) if total else None

    def server_token_count(self, endpoint, text):
        tokens = self.get_json("POST", f"{endpoint}/tokenize", json={"inputs": text})
        return len(tokens) if isinstance(tokens, list) else None  # None: an older TGI, estimate
