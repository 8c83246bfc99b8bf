"""Assembling a local engine: from plain options (which model, int4, tensor parallel, which decoder)
to an `Engine`, the one thing the local backend (backends/local/backend.py) serves.

Three ways a model is served, each decided here and only here:
- a transformers model in this process (`from_pretrained`: bf16 across the GPUs, float32 on the
  CPU, or bitsandbytes), decoded by plain `generate` or the fast decoder (`choose_decoder`);
- `--quantize int4`: the fast decoder over int4 weights read from the checkpoint (weights.py);
- `--tensor-parallel N`: the fast decoder over N ranks, each holding its slice (parallel/ranks.py).

The app's factory maps its settings onto `EngineOptions` and wraps the engine in a LocalBackend.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from chat.conversation.errors import ConfigError
from chat.engine.decoders import Decoder, PlainDecoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    """What to load and how; plain values (the factory fills them from the app's settings)."""

    model: str  # a hub id or a model folder
    token: str | None = None
    quantize: str | None = None  # "8bit" / "4bit" (bitsandbytes) or "int4" (ours)
    save_quantized: str | None = None  # with int4: write the int4 model to this folder
    decoder: str = "auto"  # "auto", "fast" or "plain"
    tensor_parallel: int | str = 1  # ranks, or "auto"
    max_total_tokens: int | None = None  # the context; None: from the model
    dtype: str | None = None  # "float32": not bf16 on a GPU, for a model that bf16 spoils
    speculate: str = "off"  # "ngram" or "draft": speculative decoding (engine/speculation.py)
    draft_model: str | None = None  # with "draft": a hub id or folder sharing the tokenizer


@dataclass
class Engine:
    """A loaded model as the local backend serves it: the tokenizer, what decodes, the context,
    and a description for the page and logs. `model` is the transformers model where one is in
    memory (plain `generate` can then take over if the fast decoder fails to start); None where
    the decoder holds the only copy of the weights (int4, tensor parallelism)."""

    tokenizer: object
    decoder: Decoder
    context_length: int
    description: str
    model: object = None

    @classmethod
    def of_model(cls, model, tokenizer, *, context_length: int, decoder: Decoder | None = None) -> Engine:
        """A transformers model already loaded, with `decoder` (default: plain `generate`)."""
        device = getattr(getattr(model, "device", None), "type", "cpu")
        return cls(
            tokenizer,
            decoder or PlainDecoder(model, tokenizer),
            context_length,
            f"local transformers ({device})",
            model,
        )

    def warm_up(self) -> Engine:
        """Compile and capture the decoder; plain `generate` instead if that fails and a model is
        in memory. Call it on the thread that will generate: CUDA graphs belong to the thread
        that captured them."""
        start = getattr(self.decoder, "warm_up", None)
        if start is None:
            return self
        try:
            start()
        except Exception as error:
            if self.model is None:  # nothing to fall back to
                raise
            log.warning(
                "decoder: %s failed to start, using plain generate (%s: %s)",
                self.decoder.name,
                type(error).__name__,
                error,
                exc_info=True,
            )
            self.decoder = PlainDecoder(self.model, self.tokenizer)
        return self


def build_engine(options: EngineOptions) -> Engine:
    """The engine `options` ask for; ConfigError (one sentence) if it cannot be built."""
    try:
        check_model(options)
        if options.speculate == "off":
            return _build(options)
        if options.decoder == "auto":  # speculation runs in the fast decoder, the CPU's too
            options = dataclasses.replace(options, decoder="fast")
        return _speculating(_build(options), options)
    except ConfigError:
        raise
    except Exception as error:  # a model folder is input: what it makes fail is one sentence
        log.debug("building the engine failed", exc_info=True)
        first_line = (str(error).splitlines() or [""])[0][:200]
        raise ConfigError(
            f"cannot load model {options.model!r} ({type(error).__name__}: {first_line})"
        ) from None


def check_model(options: EngineOptions) -> None:
    """The config's sizes, before anything is allocated (limits.py), and --save-quantized's
    target, before the long work of quantizing (new_folder.py)."""
    import os

    import torch
    from transformers import AutoConfig

    from chat.engine import limits
    from chat.engine.new_folder import check_new_folder

    local = os.path.isdir(options.model)
    if local:
        limits.check_config_file(options.model)
    try:
        config = AutoConfig.from_pretrained(options.model, token=options.token, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"cannot load model {options.model!r}: not a model folder, or not reachable on the hub "
            f"({str(error).splitlines()[0][:200]})"
        ) from None
    sizes = limits.sizes(config, f"{options.model}/config.json" if local else f"{options.model}'s config")
    if local:
        if options.save_quantized:
            check_new_folder(options.save_quantized, source=options.model)
        if not limits.check_weights_match(sizes, options.model):
            return  # no weights to load: the loader says so
    if options.tensor_parallel != 1:
        return  # each rank holds a share: parallel/ranks.py counts the GPUs it needs
    cuda = torch.cuda.is_available()
    int4 = options.quantize == "int4"
    static_cache = int4 or options.decoder == "fast" or (options.decoder == "auto" and cuda)
    bits = {"int4": 4.5, "4bit": 4.5, "8bit": 8}.get(options.quantize, 16 if cuda else 32)
    free = limits.free_memory(cuda, all_gpus=not int4)
    if cuda and not static_cache and free is not None:  # accelerate spills what the GPUs cannot hold
        free += limits.free_memory(False, all_gpus=False) or 0
    limits.check_fits(
        sizes,
        weight_bytes=bits / 8,
        context=(options.max_total_tokens or limits.config_context(config) or 2048) if static_cache else None,
        element_bytes=2 if cuda else 4,
        free=free,
        where=("the GPU" if static_cache else "the GPUs and this machine") if cuda else "this machine",
    )


def _speculating(engine: Engine, options: EngineOptions) -> Engine:
    """`engine` with its fast decoder verifying proposals: prompt lookup, or a draft model built
    as the model is (int4 too), with its own decoder and cache (engine/speculation.py)."""
    from chat.engine.speculation import DraftModel, PromptLookup, draft_cost

    flag = f"--speculate {options.speculate}"
    if options.tensor_parallel != 1 or not hasattr(engine.decoder, "speculate"):
        raise ConfigError(f"{flag} runs in the fast decoder on one device; this model is served otherwise")
    if options.speculate == "ngram":
        engine.decoder.speculate(PromptLookup())
        engine.description += ", speculating: prompt lookup"
        return engine
    check_model(dataclasses.replace(options, model=options.draft_model, save_quantized=None))
    draft_options = dataclasses.replace(
        options, model=options.draft_model, save_quantized=None, max_total_tokens=engine.context_length
    )
    draft = _build(draft_options)
    if not hasattr(draft.decoder, "speculate"):
        raise ConfigError(f"--draft-model {options.draft_model}: the fast decoder cannot run it")
    if draft.tokenizer.get_vocab() != engine.tokenizer.get_vocab():
        raise ConfigError(f"--draft-model {options.draft_model} does not share the model's tokenizer")
    engine.decoder.speculate(
        DraftModel(draft.decoder, draft_cost(draft.decoder.layout, engine.decoder.layout))
    )
    engine.description += f", speculating: draft {options.draft_model}"
    return engine


def _build(options: EngineOptions) -> Engine:
    if options.tensor_parallel != 1:
        engine = _tensor_parallel_engine(options)
        if engine is not None:
            return engine
    if options.quantize == "int4":
        return _int4_engine(options)
    model, tokenizer = load_model(
        options.model, quantize=options.quantize, token=options.token, dtype=options.dtype
    )
    context_length = options.max_total_tokens or model_context_length(model.config, tokenizer)
    decoder = choose_decoder(options.decoder, model, tokenizer, context_length)
    return Engine.of_model(model, tokenizer, context_length=context_length, decoder=decoder)


def choose_decoder(kind: str, model, tokenizer, max_len: int) -> Decoder:
    """`plain`, `fast`, or `auto`: the fast decoder where a CUDA GPU and the model allow it."""
    if kind == "plain":
        return PlainDecoder(model, tokenizer)
    from chat.engine.decode_loop import FastDecoder
    from chat.engine.layout import Unsupported

    on_gpu = getattr(getattr(model, "device", None), "type", "cpu") == "cuda"
    if kind == "auto" and not on_gpu:
        # Not "needs a GPU": --decoder fast runs on the CPU too, it is only not faster there.
        log.info(
            "decoder: plain generate (auto takes the fast decoder on a CUDA GPU; --decoder fast forces it)"
        )
        return PlainDecoder(model, tokenizer)
    try:
        decoder = FastDecoder(model, tokenizer, max_len=max_len)
    except Unsupported as error:
        if kind == "fast":
            raise ConfigError(f"--decoder fast: {error}") from None
        log.info("decoder: plain generate (fast decoder: %s)", error)
        return PlainDecoder(model, tokenizer)
    log.info("decoder: %s, cache of %d tokens", decoder.name, max_len)
    return decoder


def load_model(
    model_id: str, *, quantize: str | None = None, token: str | None = None, dtype: str | None = None
):
    """Model and tokenizer: bf16 across all GPUs where there are GPUs, float32 on the CPU; `dtype`
    ("float32") overrides the GPU's bf16."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kwargs: dict = {"token": token}
    if torch.cuda.is_available():
        kwargs.update(dtype=getattr(torch, dtype or "bfloat16"), device_map="auto")
    else:
        kwargs.update(dtype=torch.float32)
    if quantize:
        kwargs["quantization_config"] = _quantization_config(quantize)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, token=token)
        model = AutoModelForCausalLM.from_pretrained(model_id, **kwargs)
    except OSError as error:
        raise ConfigError(
            f"cannot load model {model_id!r}: not a model folder, or not reachable on the hub "
            f"({str(error).splitlines()[0][:200]})"
        ) from None
    model.eval()
    return model, tokenizer


def _quantization_config(quantize: str):
    import importlib.util

    import torch
    from transformers import BitsAndBytesConfig

    if not torch.cuda.is_available():
        raise ConfigError(f"--quantize {quantize} needs a CUDA GPU; none is visible")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"--quantize {quantize} needs bitsandbytes: pip install bitsandbytes")
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4"
    )


def model_context_length(config, tokenizer) -> int:
    """The model's context: its config's, else the tokenizer's, else Falcon's 2,048; what a
    folder claims counts up to limits.MAX_CONFIG_CONTEXT tokens (it sizes the static cache)."""
    from chat.engine.limits import MAX_CONFIG_CONTEXT, config_context

    length = config_context(config)
    if length is None:
        length = getattr(tokenizer, "model_max_length", None)  # 1e30 where a tokenizer sets none
        length = length if isinstance(length, int) and 0 < length <= MAX_CONFIG_CONTEXT else None
    return length or 2048


def _int4_engine(options: EngineOptions) -> Engine:
    """The fast decoder over int4 weights on one device: quantized while loading, converted from a
    GPTQ/AWQ checkpoint, or read back from a folder `--save-quantized` wrote (weights.py)."""
    import torch
    from transformers import AutoTokenizer

    from chat.engine.decode_loop import FastDecoder
    from chat.engine.int4.products import int4_products
    from chat.engine.int4.saved import Int4Writer
    from chat.engine.layout import Unsupported
    from chat.engine.parallel.ranks import model_folder
    from chat.engine.weights import CheckpointSource, lay_out

    if options.decoder == "plain":
        raise ConfigError("--quantize int4 runs the fast decoder; it cannot be used with --decoder plain")
    folder = model_folder(options.model, options.token)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    writer = Int4Writer(options.save_quantized, folder) if options.save_quantized else None
    try:
        source = CheckpointSource(folder, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        context_length = options.max_total_tokens or model_context_length(source.config, tokenizer)
        products = int4_products(device)
        layout = lay_out(source, max_len=context_length, products=products, quantize="hqq", save=writer)
        if writer is not None:
            writer.finish(source.config, folder)
    except BaseException as error:
        if writer is not None:
            writer.discard()  # nothing half-written is left behind
        if isinstance(error, Unsupported):
            raise ConfigError(f"--quantize int4: {error}") from None
        if isinstance(error, OSError | ValueError):
            raise ConfigError(
                f"--quantize int4: cannot load {options.model!r} ({str(error)[:200]})"
            ) from None
        raise
    decoder = FastDecoder.from_layout(layout, tokenizer.eos_token_id)
    return Engine(tokenizer, decoder, context_length, f"local int4 ({device}, {products.name})")


def _checkpoint_quantization(folder):
    """The GPTQ/AWQ quantization `folder`'s checkpoint carries, or None."""
    from chat.engine.int4 import checkpoints as checkpoint_quantization
    from chat.engine.layout import Unsupported

    try:
        return checkpoint_quantization.read(folder)
    except Unsupported as error:
        raise ConfigError(f"--quantize int4: {error}") from None


def _tensor_parallel_engine(options: EngineOptions) -> Engine | None:
    """The fast decoder over N ranks, or None where `auto` finds one GPU enough."""
    from transformers import AutoConfig, AutoTokenizer

    from chat.engine.layout import Unsupported
    from chat.engine.parallel import ranks as tp
    from chat.engine.weights import CheckpointWeights

    int4 = options.quantize == "int4"
    folder = tp.model_folder(options.model, options.token)
    quantization = _checkpoint_quantization(folder) if int4 else None
    if quantization is not None:
        if options.tensor_parallel == "auto":
            return None
        raise ConfigError(
            f"--quantize int4 loads a {quantization.method} checkpoint on one GPU: use --tensor-parallel 1"
        )
    config = AutoConfig.from_pretrained(folder)
    ranks = tp.ranks_for(options.tensor_parallel, config, bytes_per_weight=0.5625 if int4 else 2.0)
    if ranks == 1:
        return None
    if options.decoder == "plain":
        raise ConfigError("--tensor-parallel runs the fast decoder; it cannot be used with --decoder plain")
    if options.quantize and not int4:
        raise ConfigError("--tensor-parallel does not take --quantize (bitsandbytes) weights; int4 it does")
    if options.save_quantized:
        raise ConfigError("--save-quantized runs on one GPU; it cannot be used with --tensor-parallel")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    context_length = options.max_total_tokens or model_context_length(config, tokenizer)
    spec = tp.RankSpec(
        world=ranks,
        port=tp.free_port(),
        max_len=context_length,
        eos_token_id=tokenizer.eos_token_id,
        weights=CheckpointWeights(folder),
        products="int4" if int4 else "dense",
    )
    try:
        decoder = tp.start_ranks(spec)
    except (Unsupported, OSError) as error:
        raise ConfigError(f"--tensor-parallel: {error}") from None
    kind = "int4" if int4 else "transformers"
    return Engine(tokenizer, decoder, context_length, f"local {kind} ({ranks} ranks, tensor parallel)")
