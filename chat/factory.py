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

TINY_MODEL_NAME = "tiny demo Falcon (random weights)"


def build_backend(settings: Settings) -> Backend:
    """The backend the configuration asks for."""
    if settings.backend == "local":
        return _local_backend(settings)
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


def _local_backend(settings: Settings) -> Backend:
    from chat.backends.local.backend import LocalBackend, load_model, model_context_length
    from chat.backends.local.decoders import choose_decoder
    from chat.backends.local.tiny_model import ensure_tiny_model
    from chat.conversation.prompt import choose_prompt_format

    model_id = settings.model or str(ensure_tiny_model())
    model_name = TINY_MODEL_NAME if settings.model is None else model_id
    if settings.tensor_parallel != 1:
        backend = _tensor_parallel_backend(settings, model_id, model_name)
        if backend is not None:
            return backend
    if settings.quantize == "int4":
        return _int4_backend(settings, model_id, model_name)
    model, tokenizer = load_model(model_id, quantize=settings.quantize, token=settings.token)
    context_length = settings.max_total_tokens or model_context_length(model.config, tokenizer)
    return LocalBackend(
        model,
        tokenizer,
        model_name=model_name,
        context_length=context_length,
        decoder=choose_decoder(settings.decoder, model, tokenizer, context_length),
        prompt_format=choose_prompt_format(settings.prompt_format, tokenizer),
    )


def _int4_backend(settings: Settings, model_id: str, model_name: str) -> Backend:
    """The fast decoder over int4 weights on one device (int4/loading.py), quantized while loading."""
    import torch
    from transformers import AutoTokenizer

    from chat.backends.local.backend import LocalBackend, model_context_length
    from chat.conversation.prompt import choose_prompt_format
    from chat.engine.decode_loop import FastDecoder
    from chat.engine.falcon_layout import Unsupported
    from chat.engine.int4.loading import layout_from_int4, load_int4, save_int4
    from chat.engine.int4.products import int4_products
    from chat.engine.parallel.ranks import model_folder

    if settings.decoder == "plain":
        raise ConfigError("--quantize int4 runs the fast decoder; it cannot be used with --decoder plain")
    folder = model_folder(model_id, settings.token)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    try:
        model = load_int4(folder, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    except Unsupported as error:
        raise ConfigError(f"--quantize int4: {error}") from None
    except (OSError, ValueError) as error:
        raise ConfigError(f"--quantize int4: cannot load {model_id!r} ({str(error)[:200]})") from None
    if settings.save_quantized:
        save_int4(model, settings.save_quantized, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    context_length = settings.max_total_tokens or model_context_length(model.config, tokenizer)
    layout = layout_from_int4(model, max_len=context_length, products=int4_products(device))
    decoder = FastDecoder.from_layout(layout, tokenizer.eos_token_id)
    return LocalBackend(
        None,
        tokenizer,
        model_name=model_name,
        context_length=context_length,
        decoder=decoder,
        name=f"local int4 ({device}, {layout.products.name})",
        prompt_format=choose_prompt_format(settings.prompt_format, tokenizer),
    )


def _checkpoint_quantization(folder):
    """The GPTQ/AWQ quantization `folder`'s checkpoint carries, or None."""
    from chat.engine.falcon_layout import Unsupported
    from chat.engine.int4 import checkpoints as checkpoint_quantization

    try:
        return checkpoint_quantization.read(folder)
    except Unsupported as error:
        raise ConfigError(f"--quantize int4: {error}") from None


def _tensor_parallel_backend(settings: Settings, model_id: str, model_name: str) -> Backend | None:
    """The local backend over N ranks, or None where `auto` finds one GPU enough."""
    from transformers import AutoConfig, AutoTokenizer

    from chat.backends.local.backend import LocalBackend, model_context_length
    from chat.conversation.prompt import choose_prompt_format
    from chat.engine.parallel import ranks as tp

    int4 = settings.quantize == "int4"
    folder = tp.model_folder(model_id, settings.token)
    quantization = _checkpoint_quantization(folder) if int4 else None
    if quantization is not None:
        if settings.tensor_parallel == "auto":
            return None
        raise ConfigError(
            f"--quantize int4 loads a {quantization.method} checkpoint on one GPU: use --tensor-parallel 1"
        )
    config = AutoConfig.from_pretrained(folder)
    ranks = tp.ranks_for(settings.tensor_parallel, config, bytes_per_weight=0.5625 if int4 else 2.0)
    if ranks == 1:
        return None
    if settings.decoder == "plain":
        raise ConfigError("--tensor-parallel runs the fast decoder; it cannot be used with --decoder plain")
    if settings.quantize and not int4:
        raise ConfigError("--tensor-parallel does not take --quantize (bitsandbytes) weights; int4 it does")
    if settings.save_quantized:
        raise ConfigError("--save-quantized runs on one GPU; it cannot be used with --tensor-parallel")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    context_length = settings.max_total_tokens or model_context_length(config, tokenizer)
    spec = tp.RankSpec(
        world=ranks,
        port=tp.free_port(),
        max_len=context_length,
        eos_token_id=tokenizer.eos_token_id,
        folder=folder,
        products="int4" if int4 else "dense",
    )
    decoder = tp.start_ranks(spec)
    kind = "int4" if int4 else "transformers"
    return LocalBackend(
        None,
        tokenizer,
        model_name=model_name,
        context_length=context_length,
        decoder=decoder,
        name=f"local {kind} ({ranks} ranks, tensor parallel)",
        prompt_format=choose_prompt_format(settings.prompt_format, tokenizer),
    )
