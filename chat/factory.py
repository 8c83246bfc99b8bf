"""From the app's configuration to a backend: the one place that reads `Settings` for them.

Each backend's constructor takes plain values (endpoints, a token, timeouts); only this module
knows which setting feeds which argument. It imports just the backend asked for, so a remote-only
deployment never imports torch.
"""

from __future__ import annotations

from chat.backends.remote.failover import RemoteOptions
from chat.config import DEFAULT_REMOTE_CONCURRENCY, Settings
from chat.conversation.backend import Backend
from chat.conversation.errors import ConfigError


def build_backend(settings: Settings) -> Backend:
    """The backend the configuration asks for."""
    if settings.backend == "local":
        from chat.backends.local.model_source import local_model_source

        # Checked before anything loads: a missing folder or an unreachable hub is one sentence.
        source = local_model_source(settings.model, token=settings.token)
        backend = _local_backend(settings, source)
        backend.notice = source.notice
        return backend
    if settings.backend == "tgi":
        from chat.backends.remote.tgi import TGIBackend

        endpoints = [endpoint.rstrip("/") for endpoint in settings.endpoints]
        return TGIBackend(
            endpoints,
            token=settings.token,
            model_name=settings.model,
            prompt_format=server_prompt_format(settings),
            **_remote(settings),
        )
    if settings.backend == "openai":
        from chat.backends.remote.openai_compat import OpenAIBackend, openai_base_url

        endpoints = [openai_base_url(endpoint) for endpoint in settings.endpoints]
        return OpenAIBackend(
            endpoints,
            model=settings.model,
            api_key=settings.api_key,
            prompt_format=server_prompt_format(settings),
            **_remote(settings),
        )
    if settings.backend == "sagemaker":
        from chat.backends.remote.sagemaker import SageMakerBackend

        return SageMakerBackend(
            settings.endpoints,
            model_name=settings.model,
            prompt_format=server_prompt_format(settings),
            **_remote(settings),
        )
    raise ConfigError(f"backend {settings.backend!r} is not available in this version")


def server_prompt_format(settings: Settings):
    """`template`: messages to the server's chat route, which applies the model's template.
    `falcon` and `auto`: the Falcon format as text (a server does not tell whether its model has a
    template; the README says when to choose `template`)."""
    from chat.conversation.prompt import FalconFormat, ServerTemplateFormat

    return ServerTemplateFormat() if settings.prompt_format == "template" else FalconFormat()


def remote_options(settings: Settings) -> RemoteOptions:
    """Timeouts and retry policy from the flags; unset flags keep `RemoteOptions`' defaults."""
    given = dict(
        connect_timeout_s=settings.connect_timeout_s,
        first_token_timeout_s=settings.first_token_timeout_s,
        token_timeout_s=settings.token_timeout_s,
        busy_retries=settings.busy_retries,
        cooldown_s=settings.endpoint_cooldown_s,
    )
    return RemoteOptions(**{name: value for name, value in given.items() if value is not None})


def _remote(settings: Settings) -> dict:
    """The keyword arguments every RemoteBackend takes."""
    return dict(
        options=remote_options(settings),
        concurrency_limit=settings.concurrency_limit or DEFAULT_REMOTE_CONCURRENCY,
        max_total_tokens=settings.max_total_tokens,
    )


def _local_backend(settings: Settings, source) -> Backend:
    """A model in this process: the engine is assembled by chat/engine/build.py."""
    from chat.backends.local.backend import LocalBackend
    from chat.conversation.prompt import choose_prompt_format
    from chat.engine.build import EngineOptions, build_engine

    engine = build_engine(
        EngineOptions(
            model=source.path,
            token=settings.token,
            quantize=settings.quantize,
            save_quantized=settings.save_quantized,
            decoder=settings.decoder,
            tensor_parallel=settings.tensor_parallel,
            max_total_tokens=settings.max_total_tokens,
            dtype=source.dtype,
            speculate=settings.speculate,
            draft_model=settings.draft_model,
        )
    )
    return LocalBackend(
        engine,
        model_name=source.name,
        prompt_format=choose_prompt_format(settings.prompt_format, engine.tokenizer),
    )
