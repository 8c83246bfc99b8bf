"""OpenAI-compatible backend: `/v1/completions` on vLLM, SGLang, TGI or `transformers serve`.

The legacy completions route takes our own Falcon prompt and stop sequences as they are; with
`--prompt-format template` the chat route (`/v1/chat/completions`) gets role/content messages and
the server applies the model's own chat template. Both are posted with the backend's own HTTP
client (`RemoteBackend.post_stream`) and read by chat_events.py, as TGI's Messages API is: one
reader for every stream, which bounds the length of a line and checks the type of every field.
(The `openai` SDK reads an event of any size into memory and waits for a response's headers as
long as for a token.) Retries are `failover.failover_stream`'s, once, for every backend.

What servers tell us differs, so each question has a fallback:
- the model name: --model, else the first model /v1/models lists;
- the context: /v1/models `max_model_len` (vLLM), else --max-total-tokens, else 2,048;
- token counts: POST /tokenize at the server root (vLLM), else a safe over-estimate.
`transformers serve` 5.23 answers /v1/models with HTTP 500 when no Hub cache folder exists and has
no /tokenize, so against it the model name must be given and counts are estimated.

No API key sends no `Authorization` header at all.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from chat.backends.remote.base import RemoteBackend, positive_int
from chat.backends.remote.chat_events import (
    chat_request,
    tokens_from_chat_lines,
    tokens_from_completion_lines,
)
from chat.backends.remote.failover import RemoteOptions
from chat.conversation.errors import BackendError, BackendTimeout, BackendUnavailable, ConfigError
from chat.conversation.params import GenerationParams
from chat.conversation.prompt import ChatMessages

OPENAI_MAX_STOP_SEQUENCES = 4  # the API's limit; our stop filter applies the rest


def completion_arguments(params: GenerationParams) -> dict:
    """Our parameters as /v1/completions takes them; vLLM and SGLang take `repetition_penalty`
    and `top_k` beside the standard ones."""
    arguments = dict(
        max_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        seed=params.seed,
        stop=list(params.stop_sequences[:OPENAI_MAX_STOP_SEQUENCES]) or None,
        repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1.0 else None,
        top_k=params.top_k or None,
    )
    return {name: value for name, value in arguments.items() if value is not None}


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
        self._listed: dict[str, dict] = {}
        self.model_name = model or self._first_listed_model()
        self.name = "an OpenAI-compatible server"

    def open_stream(self, endpoint, prompt, params, watchdog):
        if isinstance(prompt, ChatMessages):  # the chat route: the server applies the template
            body = {**chat_request(prompt, params, self.model_name), **completion_arguments(params)}
            if prompt.continues_reply:
                # Continue: vLLM and SGLang resume the last message with these two (vllm#8942);
                # `transformers serve` 5.23 refuses them (HTTP 422, said in one sentence).
                body["add_generation_prompt"] = False
            return tokens_from_chat_lines(self.post_stream(f"{endpoint}/chat/completions", body, watchdog))
        body = {"model": self.model_name, "prompt": prompt, "stream": True, **completion_arguments(params)}
        return tokens_from_completion_lines(self.post_stream(f"{endpoint}/completions", body, watchdog))

    def health_url(self, endpoint):
        return f"{endpoint.removesuffix('/v1')}/health"  # vLLM, SGLang, transformers serve

    def server_context_length(self, endpoint):
        listed = self._models(endpoint).get(self.model_name) or {}
        return positive_int(listed.get("max_model_len"))

    def server_token_count(self, endpoint, text):
        root = endpoint.removesuffix("/v1")  # vLLM serves /tokenize beside /v1, not under it
        counted = self.get_json("POST", f"{root}/tokenize", json={"model": self.model_name, "prompt": text})
        if isinstance(counted, dict) and isinstance(counted.get("count"), int):
            return counted["count"]
        return None  # no tokenizer route: the caller estimates

    def _first_listed_model(self) -> str:
        listed = self.first_answer(lambda endpoint: next(iter(self._models(endpoint)), None))
        if listed is None:
            raise ConfigError("--backend openai needs --model (env MODEL_ID): no server listed a model")
        return listed

    def _models(self, endpoint) -> dict[str, dict]:
        if endpoint not in self._listed:
            try:
                listed = self.get_json("GET", f"{endpoint}/models")
            except (BackendUnavailable, BackendTimeout):
                raise  # not reachable now: ask again next time
            except BackendError:
                listed = {}  # it answered, but cannot list (transformers serve without a Hub cache)
            models = listed.get("data") if isinstance(listed, dict) else None
            self._listed[endpoint] = {
                m["id"][:200]: m
                for m in (models if isinstance(models, list) else [])
                if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"].strip()
            }
        return self._listed[endpoint]
