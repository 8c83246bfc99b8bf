"""TGI backend: Text Generation Inference's `/generate_stream`, through `huggingface_hub`.

`InferenceClient.text_generation(stream=True, details=True)` speaks TGI's protocol. Two of its
habits need handling, both in `_ServerClient`:

- It sends requests through huggingface_hub's shared HTTP session, whose request hook refuses
  every request while HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, even to a TGI on loopback.
  That switch is about the Hugging Face Hub; a server named with --endpoint is not the Hub, and
  this app sets the switch itself for its offline default. So `_ServerClient` overrides the one
  method that sends (`_inner_post`) to use its own `httpx2.Client` without that hook: offline
  mode still guards every Hub download, and a TGI endpoint works either way.
- It keeps an unfinished stream open until the client is closed, so each request gets its own
  client, closed in the stream's `finally:`; that closes the connection and TGI stops generating.

The same override sends `Authorization` only when a token is configured (InferenceClient would
otherwise send the locally stored Hub token to whatever server the URL names), and turns HTTP
errors into our error kinds. Prompt budgets come from the server: GET /info for the context,
POST /tokenize for counts.
"""

from __future__ import annotations

import logging

import httpx2
from huggingface_hub import InferenceClient
from huggingface_hub.errors import InferenceTimeoutError, TextGenerationError

from ..config import Settings
from ..errors import BackendError, BackendTimeout, GenerationFailed
from ..params import GenerationParams
from .remote import (
    RemoteOptions,
    Watchdog,
    error_for_event,
    error_for_exception,
    error_for_status,
    shutdown_response,
)
from .remote_backend import (
    RemoteBackend,
    auth_headers,
    error_text,
    http_timeout,
    remote_arguments,
    shared_tls_context,
)
from .tgi_events import make_token

log = logging.getLogger(__name__)

TGI_MAX_STOP_SEQUENCES = 4  # TGI's default --max-stop-sequences; our stop filter applies them all
_ERROR_TYPES = {  # huggingface_hub's exception classes -> TGI's error_type
    "ValidationError": "validation",
    "OverloadedError": "overloaded",
    "GenerationError": "generation",
    "IncompleteGenerationError": "incomplete_generation",
}


def tgi_parameters(params: GenerationParams) -> dict:
    """Our parameters as TGI accepts them (it rejects temperature 0 and top_p 1.0)."""
    sampling = {}
    if not params.greedy:
        sampling = dict(
            temperature=params.temperature,
            top_p=params.top_p if params.top_p < 1.0 else None,
            top_k=params.top_k or None,
        )
    return dict(
        do_sample=not params.greedy,
        max_new_tokens=params.max_new_tokens,
        repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1.0 else None,
        seed=params.seed,
        stop=list(params.stop_sequences[:TGI_MAX_STOP_SEQUENCES]),
        **sampling,
    )


class _ServerClient(InferenceClient):
    """An InferenceClient for one request to one server; see the module docstring."""

    def __init__(self, url: str, *, token: str | None, options: RemoteOptions, watchdog: Watchdog):
        super().__init__(model=url)
        self._http = self.exit_stack.enter_context(
            httpx2.Client(timeout=http_timeout(options), verify=shared_tls_context())
        )
        self._auth = auth_headers(token)
        self._watchdog = watchdog

    def _inner_post(self, request_parameters, *, stream: bool = False):
        headers = {k: v for k, v in request_parameters.headers.items() if k.lower() != "authorization"}
        request = self._http.stream(
            "POST",
            request_parameters.url,
            json=request_parameters.json,
            content=request_parameters.data,
            headers={**headers, **self._auth},
        )
        response = self.exit_stack.enter_context(request)
        self._watchdog.on_expiry(lambda: shutdown_response(response))
        if response.status_code >= 400:
            response.read()
            raise error_for_status(response.status_code, error_text(response))
        return response.iter_lines() if stream else response.read()


class TGIBackend(RemoteBackend):
    """Streams from one or more TGI servers (or Inference Endpoints running TGI)."""

    def __init__(self, endpoints, *, token=None, options=RemoteOptions(), concurrency_limit=64,
                 max_total_tokens=None, model_name=None):
        super().__init__(endpoints, options=options, concurrency_limit=concurrency_limit,
                         max_total_tokens=max_total_tokens, token=token)
        self._token = token
        self.model_name = model_name or "Falcon"
        self.name = "Text Generation Inference"

    @classmethod
    def from_settings(cls, settings: Settings) -> TGIBackend:
        endpoints = [endpoint.rstrip("/") for endpoint in settings.endpoints]
        return cls(endpoints, token=settings.token, model_name=settings.model, **remote_arguments(settings))

    def open_stream(self, endpoint, prompt, params, watchdog):
        client = _ServerClient(f"{endpoint}/generate_stream", token=self._token,
                               options=self.options, watchdog=watchdog)
        try:
            outputs = client.text_generation(
                prompt, stream=True, details=True, return_full_text=False, **tgi_parameters(params)
            )
            finished = False
            for output in outputs:
                details = output.details
                finished = finished or details is not None
                yield make_token(
                    output.token.text, output.token.id, output.token.special,
                    details.finish_reason if details else None, details.seed if details else None,
                )
            if not finished:
                # TGI's last event always carries `details`: a stream that ends without it was cut
                # off (a proxy timing out, a server restarting), not a finished reply.
                raise GenerationFailed(
                    "The connection to the model server broke off. Please try again.",
                    detail="the stream ended without TGI's final event",
                )
        except BackendError:
            raise
        except TextGenerationError as error:
            raise error_for_event(_ERROR_TYPES.get(type(error).__name__), str(error)) from None
        except InferenceTimeoutError as error:
            raise BackendTimeout(detail=str(error)) from None
        except (httpx2.HTTPError, OSError) as error:
            raise error_for_exception(error) from None
        finally:
            client.close()

    def health_url(self, endpoint):
        return f"{endpoint}/health"

    def server_context_length(self, endpoint):
        server = self.get_json("GET", f"{endpoint}/info") or {}
        if self.model_name == "Falcon" and server.get("model_id"):
            self.model_name = server["model_id"]
        total = server.get("max_total_tokens")
        return int(total) if total else None

    def server_token_count(self, endpoint, text):
        tokens = self.get_json("POST", f"{endpoint}/tokenize", json={"inputs": text})
        return len(tokens) if isinstance(tokens, list) else None  # None: an older TGI, estimate
