"""OpenAI-compatible backend: `/v1/completions` on vLLM, SGLang, TGI or `transformers serve`.

The legacy completions route takes our own Falcon prompt and stop sequences as they are; with
`--prompt-format template` the chat route (`/v1/chat/completions`) gets role/content messages and
the server applies the model's own chat template. Through the `openai` package, with its
retries off (`failover.failover_stream` retries, once, for every backend).

What servers tell us differs, so each question has a fallback:
- the model name: --model, else the first model /v1/models lists;
- the context: /v1/models `max_model_len` (vLLM), else --max-total-tokens, else 2,048;
- token counts: POST /tokenize at the server root (vLLM), else a safe over-estimate.
`transformers serve` 5.23 answers /v1/models with HTTP 500 when no Hub cache folder exists and has
no /tokenize, so against it the model name must be given and counts are estimated.

No API key sends no `Authorization` header at all (the SDK insists on a key, so a placeholder is
passed and the header is explicitly omitted per request).
"""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx2
import openai

from chat.backends.remote.base import RemoteBackend, error_text, http_timeout
from chat.backends.remote.failover import (
    RemoteOptions,
    error_for_event,
    error_for_exception,
    error_for_status,
    shutdown_response,
)
from chat.conversation.backend import FINISH_LENGTH, FINISH_STOP, Token
from chat.conversation.errors import BackendError, BackendTimeout, BackendUnavailable, ConfigError
from chat.conversation.params import GenerationParams
from chat.conversation.prompt import ChatMessages

OPENAI_MAX_STOP_SEQUENCES = 4  # the API's limit; our stop filter applies the rest
_NO_KEY = "no-key"  # never sent: see the module docstring


def completion_arguments(params: GenerationParams) -> dict:
    """Our parameters as /v1/completions takes them; the non-standard ones go in extra_body."""
    extra = {}
    if params.repetition_penalty != 1.0:
        extra["repetition_penalty"] = params.repetition_penalty  # vLLM, SGLang
    if params.top_k:
        extra["top_k"] = params.top_k
    return dict(
        max_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        seed=params.seed,
        stop=list(params.stop_sequences[:OPENAI_MAX_STOP_SEQUENCES]) or None,
        extra_body=extra or None,
    )


def openai_base_url(endpoint: str) -> str:
    """`http://host:8000` means its `/v1`, where every OpenAI-compatible server has its routes."""
    endpoint = endpoint.rstrip("/")
    return endpoint if urlsplit(endpoint).path else endpoint + "/v1"


class OpenAIBackend(RemoteBackend):
    """Streams from one or more OpenAI-compatible servers (`--endpoint http://host:port/v1`)."""

    def __init__(
        self,
        endpoints,
        *,
        model=None,
        api_key=None,
        options=RemoteOptions(),
        concurrency_limit=64,
        max_total_tokens=None,
        prompt_format=None,
    ):
        super().__init__(
            endpoints,
            options=options,
            concurrency_limit=concurrency_limit,
            max_total_tokens=max_total_tokens,
            token=api_key,
            prompt_format=prompt_format,
        )
        self._api_key = api_key
        self._clients = {
            endpoint: openai.OpenAI(
                base_url=endpoint,
                api_key=api_key or _NO_KEY,
                max_retries=0,
                timeout=http_timeout(options),
            )
            for endpoint in self.pool.endpoints
        }
        self._listed: dict[str, dict] = {}
        self.model_name = model or self._first_listed_model()
        self.name = "an OpenAI-compatible server"

    def open_stream(self, endpoint, prompt, params, watchdog):
        stream = None
        try:
            client = self._clients[endpoint]
            common = dict(
                model=self.model_name,
                stream=True,
                extra_headers={} if self._api_key else {"Authorization": openai.Omit()},
                **completion_arguments(params),
            )
            if isinstance(prompt, ChatMessages):  # the chat route: the server applies the template
                stream = client.chat.completions.create(messages=prompt.as_dicts(), **common)
            else:
                stream = client.completions.create(prompt=prompt, **common)
            watchdog.on_expiry(lambda: shutdown_response(stream.response))
            for chunk in stream:
                for choice in chunk.choices[:1]:
                    finish = choice.finish_reason
                    text = choice.delta.content if hasattr(choice, "delta") else choice.text
                    yield Token(
                        text or "",
                        finish_reason=(FINISH_LENGTH if finish == "length" else FINISH_STOP)
                        if finish
                        else None,
                    )
        except openai.APIStatusError as error:
            raise error_for_status(error.status_code, error_text(error.response)) from None
        except openai.APITimeoutError as error:
            raise BackendTimeout(detail=str(error)) from None
        except openai.APIConnectionError as error:
            raise error_for_exception(error) from None
        except openai.APIError as error:  # an error event inside the stream
            raise error_for_event(None, f"{error.message} {error.body}") from None
        except (httpx2.HTTPError, OSError) as error:
            raise error_for_exception(error) from None
        finally:
            if stream is not None:
                stream.close()  # closes the HTTP response: the server stops generating

    def health_url(self, endpoint):
        return f"{endpoint.removesuffix('/v1')}/health"  # vLLM, SGLang, transformers serve

    def server_context_length(self, endpoint):
        listed = self._models(endpoint).get(self.model_name) or {}
        length = listed.get("max_model_len")
        return int(length) if length else None

    def server_token_count(self, endpoint, text):
        root = endpoint.removesuffix("/v1")  # vLLM serves /tokenize beside /v1, not under it
        counted = self.get_json("POST", f"{root}/tokenize", json={"model": self.model_name, "prompt": text})
        if isinstance(counted, dict) and isinstance(counted.get("count"), int):
            return counted["count"]
        return None  # no tokenizer route: the caller estimates

    def _first_listed_model(self) -> str:
        for endpoint in self.pool.endpoints:
            try:
                models = self._models(endpoint)
            except BackendError:
                continue
            if models:
                return next(iter(models))
        raise ConfigError("--backend openai needs --model (env MODEL_ID): no server listed a model")

    def _models(self, endpoint) -> dict[str, dict]:
        if endpoint not in self._listed:
            try:
                listed = self.get_json("GET", f"{endpoint}/models") or {}
            except (BackendUnavailable, BackendTimeout):
                raise  # not reachable now: ask again next time
            except BackendError:
                listed = {}  # it answered, but cannot list (transformers serve without a Hub cache)
            self._listed[endpoint] = {m["id"]: m for m in listed.get("data", []) if "id" in m}
        return self._listed[endpoint]

    def close(self):
        super().close()
        for client in self._clients.values():
            client.close()
