"""TGI backend: Text Generation Inference's `/generate_stream`, spoken directly over httpx.

The request is TGI's `{"inputs", "parameters": {..., "details": true}, "stream": true}`; the
answer is server-sent events, read by `tgi_events.tokens_from_lines`, as the SageMaker
backend uses (huggingface_hub's `InferenceClient` speaks the same protocol, but builds and
deep-copies dataclasses for every token: about 0.3 ms of CPU per token, a third of this app's
CPU time with 64 streams; docs/reliability.md). Requests go through the backend's one
`httpx2.Client` (`RemoteBackend.post_stream`; so not through huggingface_hub's session, whose
offline switch would refuse even a TGI on loopback), carry `Authorization` only when a token is
configured, and are closed when the stream is: closing the connection is how TGI learns to stop
generating. HTTP errors and error events become our error kinds. Prompt budgets come from the
server: GET /info for the context and the input limit, POST /tokenize for counts.
"""

from __future__ import annotations

import logging

from chat.backends.remote.base import RemoteBackend, positive_int
from chat.backends.remote.chat_events import chat_request, tokens_from_chat_lines
from chat.backends.remote.failover import RemoteOptions
from chat.backends.remote.tgi_events import generate_request, tokens_from_lines
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
        if isinstance(prompt, ChatMessages):  # the Messages API: TGI applies the model's template
            route, body, read = "/v1/chat/completions", chat_request(prompt, params), tokens_from_chat_lines
        else:
            route, body, read = "/generate_stream", generate_request(prompt, params), tokens_from_lines
        return read(self.post_stream(endpoint + route, body, watchdog))

    def health_url(self, endpoint):
        return f"{endpoint}/health"

    def server_context_length(self, endpoint):
        server = self.get_json("GET", f"{endpoint}/info")
        server = server if isinstance(server, dict) else {}
        model_id = server.get("model_id")
        if self.model_name == "Falcon" and isinstance(model_id, str) and model_id.strip():
            self.model_name = model_id.strip()[:200]  # shown on the page, as text
        # The prompt's own limit (`max_input_length` before TGI 2.0): often half the context, and a
        # prompt over it is refused even when prompt + reply would fit.
        max_input = positive_int(server.get("max_input_tokens")) or positive_int(
            server.get("max_input_length")
        )
        if max_input:
            self._server_input_limit = max_input
        return positive_int(server.get("max_total_tokens"))

    def server_token_count(self, endpoint, text):
        tokens = self.get_json("POST", f"{endpoint}/tokenize", json={"inputs": text})
        return len(tokens) if isinstance(tokens, list) else None  # None: an older TGI, estimate
