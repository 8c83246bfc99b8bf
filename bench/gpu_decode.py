"""Decode speed at batch 1 on whatever GPU is here: the weight-streaming floor against plain
`generate` and the project's fast decoder, on a Falcon with random weights built on the GPU.

    PYTHONUNBUFFERED=1 python bench/gpu_decode.py --out bench/out/h100.json

Rows: the floor (weight bytes / measured copy bandwidth), the layer matrix products alone in one
CUDA graph, plain `generate`, `generate` + TextIteratorStreamer, the project's LocalBackend.stream
with the plain and the fast decoder, and the fast decoder bare (greedy and sampling). Also: greedy
agreement with plain `generate` (bf16), seeded determinism, and a kernel profile of the step.
`--shape tiny` (Falcon) and `--shape llama-tiny` run the same script on the CPU (a smoke test; no
graphs).

Falcon3 (the Llama layout; configs cited at FALCON3 below), bf16 and then the same model in int4
(HQQ, as `--quantize int4` quantizes), one GPU, with the issue's goals judged from the rows:

    python bench/gpu_decode.py --shape falcon3-7b --quantize int4 --out bench/results/h100-falcon3-7b.json
    python bench/gpu_decode.py --shape falcon3-10b --quantize int4 --out bench/results/h100-falcon3-10b.json

Across the visible GPUs, with weights drawn from a seed so every run holds the same model:

    python bench/gpu_decode.py --shape 40b --tensor-parallel 2 --out bench/results/tp2-40b.json
    python bench/gpu_decode.py --shape 40b --device-map --out bench/results/devmap-40b.json

`--tensor-parallel N` serves the fast decoder from N ranks (N=1: one GPU, the same weights; the
floor is then the bytes rank 0 reads per token, its share of the weights, over one GPU's copy
bandwidth); `--device-map` is the baseline: the model spread over the GPUs by accelerate, plain
`generate`. `--agree-with OTHER.json` counts the leading greedy tokens two such runs share.

`--quantize int4` has each rank hold its slices in int4 (`--int4-weights hqq|clip|none`: the
seeded bf16 slices quantized as they are read, the app's path; `random`: drawn directly in int4,
for Falcon-180B, whose bf16 would take many minutes to quantize):

    python bench/gpu_decode.py --shape 180b --tensor-parallel 2 --quantize int4 --int4-weights random
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {
    "7b": dict(
        hidden_size=4544,
        num_hidden_layers=32,
        num_attention_heads=71,
        multi_query=True,
        new_decoder_architecture=False,
    ),
    "40b": dict(
        hidden_size=8192,
        num_hidden_layers=60,
        num_attention_heads=128,
        num_kv_heads=8,
        new_decoder_architecture=True,
    ),
    "180b": dict(
        hidden_size=14848,
        num_hidden_layers=80,
        num_attention_heads=232,
        num_kv_heads=8,
        new_decoder_architecture=True,
    ),
    "tiny": dict(
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        multi_query=True,
        new_decoder_architecture=False,
    ),
}
# Falcon3 (the Llama layout). 7B: tiiuae/Falcon3-7B-Instruct's config.json, huggingface.co revision
# ca6ceed0f6d5852f44ac1fdf5f8403bccb4449c9 (the same fields as Falcon3-7B-Base's). 10B: the same
# fields with 40 layers, as tiiuae/Falcon3-10B-Base's model card states them (40 decoder blocks,
# GQA 12 query / 4 KV heads, head dimension 256, rope theta 1000042, 131K vocabulary) and as the
# config.json of checkpoints made from tiiuae/Falcon3-10B-Instruct repeats them (e.g.
# kaitchup/Falcon3-10B-Instruct-AutoRound-GPTQ-4bit). Found with the `search` tool, not downloaded.
FALCON3 = dict(
    model_type="llama",
    hidden_size=3072,
    intermediate_size=23040,
    num_attention_heads=12,
    num_key_value_heads=4,
    head_dim=256,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    rope_theta=1000042.0,
    vocab_size=131072,
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
    max_position_embeddings=32768,
    bos_token_id=11,
    eos_token_id=11,
)
SHAPES.update(
    {
        "falcon3-7b": dict(FALCON3, num_hidden_layers=28),
        "falcon3-10b": dict(FALCON3, num_hidden_layers=40),
        # The CPU smoke run of the Llama layout: Falcon3's proportions, a few MB.
        "llama-tiny": dict(
            FALCON3,
            hidden_size=384,
            intermediate_size=1024,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=64,
            num_hidden_layers=2,
            vocab_size=4096,
        ),
    }
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="7b")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--long-prompt-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--compile", default=None, help="default | max-autotune-no-cudagraphs | off")
    parser.add_argument("--skip-plain", action="store_true", help="only the fast decoder")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument(
        "--tensor-parallel", type=int, default=0, help="ranks sharing each layer (seeded weights)"
    )
    parser.add_argument(
        "--device-map", action="store_true", help="plain generate across the GPUs (accelerate)"
    )
    parser.add_argument("--agree-with", type=Path, default=None, help="another run's JSON: greedy agreement")
    parser.add_argument(
        "--quantize",
        choices=["int4"],
        default=None,
        help="int4 slices (--tensor-parallel N); on one GPU: the same model in int4 too, after bf16",
    )
    parser.add_argument(
        "--int4-weights",
        choices=["hqq", "random"],
        default="hqq",
        help="--tensor-parallel: quantize the seeded bf16 slices (HQQ, the app's), or draw random int4",
    )
    args = parser.parse_args()
    if args.compile:  # read at import by the decode loop, here and in every rank process
        os.environ["FAST_DECODE_COMPILE"] = args.compile
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)

    import torch
    import transformers

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    results: dict = {
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "shape": args.shape,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "weights": f"random int4 ({args.int4_weights})" if args.quantize else "random bf16",
        "rows": [],
    }
    say(f"device {results['device']}, torch {torch.__version__}, transformers {transformers.__version__}")
    if args.tensor_parallel or args.device_map:
        bench_across_gpus(args, results, device)
        return

    bandwidth = copy_bandwidth(device)
    results["copy_bandwidth_GBps"] = bandwidth / 1e9
    model, tokenizer = build_model(args.shape, device)
    results["weight_GB"] = unique_bytes(model) / 1e9
    floor_ms = weight_floor(model, bandwidth, results)
    rows = results["rows"]
    rows.append(row("floor (weights / copy bandwidth)", floor_ms, floor_ms))

    prompt = prompt_text(args.prompt_tokens, seed=1)
    long_prompt = prompt_text(args.long_prompt_tokens, seed=2)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    plain_tokens = None
    if not args.skip_plain:
        plain_tokens = bench_plain(model, tokenizer, prompt, long_prompt, args, rows, floor_ms)

    from chat.backends.local.backend import LocalBackend
    from chat.conversation.params import GenerationParams
    from chat.engine.build import Engine
    from chat.engine.decode_loop import FastDecoder
    from chat.engine.decoders import PlainDecoder

    if not args.skip_plain:
        plain = Engine.of_model(model, tokenizer, context_length=2048, decoder=PlainDecoder(model, tokenizer))
        backend = LocalBackend(plain, model_name="bench")
        rows.append(
            bench_stream(
                backend, "LocalBackend.stream, plain decoder", prompt, long_prompt, args, floor_ms, runs=1
            )
        )
        backend.close()

    start = time.perf_counter()
    decoder = FastDecoder(model, tokenizer, max_len=2048, compile_mode=args.compile)
    backend = LocalBackend(
        Engine.of_model(model, tokenizer, context_length=2048, decoder=decoder), model_name="bench"
    )
    results["fast_warm_up_s"] = time.perf_counter() - start
    results["fast_decoder"] = backend.decoder.name  # "plain generate" if the capture failed
    results["compile_mode"] = decoder.compile_mode
    say(f"fast decoder '{decoder.name}' ready in {results['fast_warm_up_s']:.1f} s")

    greedy = GenerationParams(temperature=0.0, max_new_tokens=args.new_tokens, stop_sequences=("\x00",))
    sampled = GenerationParams(
        temperature=0.7,
        top_p=0.9,
        top_k=50,
        repetition_penalty=1.1,
        max_new_tokens=args.new_tokens,
        stop_sequences=("\x00",),
    )
    rows.append(
        bench_stream(
            backend, "LocalBackend.stream, fast decoder", prompt, long_prompt, args, floor_ms, runs=3
        )
    )
    bare_greedy = bench_bare(backend, decoder, ids, greedy, "fast decoder, bare (greedy)", floor_ms)
    rows.append(bare_greedy)
    results["fast_greedy_tokens"] = bare_greedy["tokens"]
    # A race between the graph's two streams would show as greedy output that changes.
    results["greedy_repeatable"] = (
        bench_bare(backend, decoder, ids, greedy, "", floor_ms)["tokens"] == bare_greedy["tokens"]
    )
    first = bench_bare(backend, decoder, ids, sampled, "", floor_ms, seed=11)  # warms eager sampling
    bare_sampled = bench_bare(
        backend, decoder, ids, sampled, "fast decoder, bare (sampling)", floor_ms, seed=11
    )
    rows.append(bare_sampled)
    results["seeded_sampling_reproducible"] = first["tokens"] == bare_sampled["tokens"]
    if plain_tokens is not None:
        agree = leading_agreement(plain_tokens, bare_greedy["tokens"])
        results["greedy_agreement"] = {
            "leading": agree,
            "of": len(plain_tokens),
            "same_position": sum(a == b for a, b in zip(plain_tokens, bare_greedy["tokens"], strict=False)),
        }
    if decoder.flash is not None:
        results["attention_check"] = backend.call_on_worker(lambda: check_attention(decoder))
        say(f"flash-decoding kernels against float64 attention: {results['attention_check']}")
    if cuda and decoder.use_graphs and decoder._graphs:
        try:
            matmul_ms = backend.call_on_worker(lambda: matmuls_alone_ms(decoder))
            rows.insert(
                1, row("the step's matrix products alone (cuBLAS), one CUDA graph", matmul_ms, floor_ms)
            )
            results["profile"] = backend.call_on_worker(lambda: profile_step(decoder))
        except Exception as error:  # the table matters more than these extras
            say(f"extras failed: {type(error).__name__}: {error}")
    backend.close()
    backend = decoder = None  # the bf16 decoder's memory, before the int4 one is laid out
    if args.quantize:
        bench_int4(model, tokenizer, prompt, long_prompt, args, results, bandwidth)
    check_goals(results)
    write_results(args, results)


def bench_int4(model, tokenizer, prompt, long_prompt, args, results, bandwidth) -> None:
    """The same model laid out in int4 (HQQ, as `--quantize int4` quantizes while loading) and
    served by the same fast decoder: its floor, `LocalBackend.stream`, the fast decoder bare."""
    import gc

    import torch

    from chat.backends.local.backend import LocalBackend
    from chat.conversation.params import GenerationParams
    from chat.engine.build import Engine
    from chat.engine.decode_loop import FastDecoder
    from chat.engine.int4.products import int4_products
    from chat.engine.weights import ModelSource, lay_out

    gc.collect()
    device = model.device.type
    if device == "cuda":
        torch.cuda.empty_cache()
        torch._dynamo.config.recompile_limit = 64  # a second decoder compiles its pieces again
    products = int4_products(device)
    start = time.perf_counter()
    layout = lay_out(ModelSource(model), max_len=2048, products=products, quantize="hqq")
    results["int4_quantize_s"] = time.perf_counter() - start
    read = step_bytes(layout)
    floor_ms = read / bandwidth * 1e3
    results.update(int4_read_GB=read / 1e9, int4_floor_ms=floor_ms, int4_products=products.name)
    decoder = FastDecoder.from_layout(layout, tokenizer.eos_token_id, compile_mode=args.compile)
    del layout
    backend = LocalBackend(Engine(tokenizer, decoder, 2048, "int4"), model_name="bench")
    results["int4_warm_up_s"] = time.perf_counter() - start
    say(
        f"int4 ({products.name}): {read / 1e9:.2f} GB read a token, floor {floor_ms:.2f} ms; "
        f"quantized in {results['int4_quantize_s']:.0f} s, ready in {results['int4_warm_up_s']:.0f} s"
    )
    rows = results["rows"]
    rows.append(row(f"int4 floor ({read / 1e9:.2f} GB a token / copy bandwidth)", floor_ms, floor_ms))
    rows.append(
        bench_stream(
            backend, "LocalBackend.stream, int4 fast decoder", prompt, long_prompt, args, floor_ms, 3
        )
    )
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    greedy = GenerationParams(temperature=0.0, max_new_tokens=args.new_tokens, stop_sequences=("\x00",))
    rows.append(bench_bare(backend, decoder, ids, greedy, "int4 fast decoder, bare (greedy)", floor_ms))
    if device == "cuda":  # where the int4 step's time goes (issue #27): its products alone, then by kernel
        alone = results["int4_matmuls_alone_ms"] = backend.call_on_worker(lambda: matmuls_alone_ms(decoder))
        say(f"int4 products alone: {alone:.3f} ms a token; the rest of the step is fixed cost")
        results["int4_profile"] = backend.call_on_worker(lambda: profile_step(decoder))
    backend.close()


def check_goals(results: dict) -> None:
    """The goals of issue #26, judged from this run's rows (each against its own baseline)."""
    rows = {r["label"]: r for r in results["rows"]}
    fast = rows.get("LocalBackend.stream, fast decoder")
    plain = rows.get("plain generate")
    int4 = rows.get("LocalBackend.stream, int4 fast decoder")
    goals = {}
    if fast:
        goals["bf16 fast <= 1.15x its floor"] = (
            round(fast["ratio_to_floor"], 3),
            fast["ratio_to_floor"] <= 1.15,
        )
    if fast and plain:
        speedup = plain["ms_per_token"] / fast["ms_per_token"]
        goals["bf16 fast >= 5x plain generate"] = (round(speedup, 2), speedup >= 5)
    if fast and int4:
        speedup = fast["ms_per_token"] / int4["ms_per_token"]
        goals["int4 >= 2.5x bf16 fast tokens/s"] = (round(speedup, 2), speedup >= 2.5)
    results["goals"] = goals


# -- across GPUs: tensor parallelism and its device_map baseline ----------------------------------


def bench_across_gpus(args, results: dict, device: str) -> None:
    """The seeded model of `--shape` from N ranks (`--tensor-parallel N`) or spread by accelerate."""
    import torch

    from bench.random_weights import RandomWeights
    from chat.backends.local.backend import LocalBackend
    from chat.conversation.params import GenerationParams
    from chat.engine.build import Engine
    from chat.engine.decode_loop import FastDecoder
    from chat.engine.parallel.ranks import RankSpec, free_port, gpu_memory, rank_layout, start_ranks

    config = model_config(args.shape)
    tokenizer = word_tokenizer(config.vocab_size)
    gpus = max(1, torch.cuda.device_count())
    world = args.tensor_parallel or gpus
    bandwidth = copy_bandwidth(device)
    weight_bytes = model_bytes(config)
    results.update(
        copy_bandwidth_GBps=bandwidth / 1e9,
        weight_GB=weight_bytes / 1e9,
        gpus=gpus,
        tensor_parallel=0 if args.device_map else world,
    )
    rows = results["rows"]
    prompt, long_prompt = (
        prompt_text(args.prompt_tokens, seed=1),
        prompt_text(args.long_prompt_tokens, seed=2),
    )
    if args.device_map:  # its GPUs read their shares one after another: all the weights
        floor_ms = weight_bytes / bandwidth * 1e3
        results.update(floor_ms=floor_ms, floor_basis="bf16 weights / one GPU's copy bandwidth")
        say(
            f"copy {bandwidth / 1e12:.2f} TB/s; weights {weight_bytes / 1e9:.2f} GB; floor {floor_ms:.2f} ms/token"
        )
        rows.append(row("floor (weights / copy bandwidth)", floor_ms, floor_ms))
        model = build_model_across_gpus(config, device)
        results["device_map"] = sorted({str(p.device) for p in model.parameters()})
        results["fast_greedy_tokens"] = bench_plain(
            model, tokenizer, prompt, long_prompt, args, rows, floor_ms
        )
        finish(args, results)
        return

    start = time.perf_counter()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    spec = RankSpec(
        world=world,
        port=free_port(),
        max_len=2048,
        eos_token_id=None,
        weights=RandomWeights(config.to_dict(), int4=bool(args.quantize) and args.int4_weights == "random"),
        products="int4" if args.quantize else "dense",
    )
    if world == 1:
        layout = rank_layout(spec, 0, device, dtype)
        results["load"] = {0: {"load_s": round(time.perf_counter() - start, 2), **gpu_memory(device)}}
        decoder = FastDecoder.from_layout(layout, None)
    else:
        decoder = start_ranks(spec)
        results["load"] = decoder.peers.loaded
    say(f"loaded (seconds, GB of GPU memory, by rank): {results['load']}")
    # The floor: what rank 0 (the largest share) reads per token, at one GPU's copy bandwidth.
    read = step_bytes(decoder.layout)
    floor_ms = read / bandwidth * 1e3
    results.update(
        rank_read_GB=read / 1e9,
        floor_ms=floor_ms,
        floor_basis="bytes rank 0 reads per token (its slices of the products as packed: int4 "
        "levels + scales and offsets, or bf16; norms; one embedding row) / copy bandwidth",
    )
    say(
        f"copy {bandwidth / 1e12:.2f} TB/s; weights {weight_bytes / 1e9:.2f} GB in bf16; rank 0 reads "
        f"{read / 1e9:.2f} GB a token ({decoder.layout.products.name}); floor {floor_ms:.2f} ms/token"
    )
    rows.append(row(f"floor (rank 0's {read / 1e9:.1f} GB a token / copy bandwidth)", floor_ms, floor_ms))
    backend = LocalBackend(Engine(tokenizer, decoder, 2048, f"{world} ranks"), model_name="bench")
    results["fast_warm_up_s"] = time.perf_counter() - start
    results["fast_decoder"] = backend.decoder.name
    results["gpu_memory_ready"] = {"rank 0": gpu_memory(device), "every GPU (nvidia-smi)": gpu_memory_used()}
    say(
        f"'{backend.decoder.name}' ready in {results['fast_warm_up_s']:.1f} s; memory {results['gpu_memory_ready']}"
    )
    label = f"fast decoder, tensor parallel x{world}"
    rows.append(
        bench_stream(backend, f"LocalBackend.stream, {label}", prompt, long_prompt, args, floor_ms, runs=3)
    )
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    greedy = GenerationParams(temperature=0.0, max_new_tokens=args.new_tokens)
    sampled = GenerationParams(
        temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.1, max_new_tokens=args.new_tokens
    )
    bare = bench_bare(backend, decoder, ids, greedy, f"{label}, bare (greedy)", floor_ms)
    rows.append(bare)
    results["fast_greedy_tokens"] = bare["tokens"]
    results["greedy_repeatable"] = (
        bench_bare(backend, decoder, ids, greedy, "", floor_ms)["tokens"] == bare["tokens"]
    )
    bench_bare(backend, decoder, ids, sampled, "", floor_ms, seed=11)
    rows.append(bench_bare(backend, decoder, ids, sampled, f"{label}, bare (sampling)", floor_ms, seed=11))
    if device == "cuda" and decoder._graphs:
        try:
            matmul_ms = backend.call_on_worker(lambda: matmuls_alone_ms(decoder))
            rows.insert(1, row("rank 0's matrix products alone, one CUDA graph", matmul_ms, floor_ms))
            short = greedy.with_max_new_tokens(64)
            generate = lambda: decoder.generate(ids, short, 0, lambda token: None, lambda: False)  # noqa: E731
            results["profile"] = backend.call_on_worker(lambda: profile_step(decoder, 64, generate))
        except Exception as error:  # the table matters more than these extras
            say(f"extras failed: {type(error).__name__}: {error}")
    results["gpu_memory_end"] = {"rank 0": gpu_memory(device), "every GPU (nvidia-smi)": gpu_memory_used()}
    say(f"GPU memory at the end: {results['gpu_memory_end']}")
    backend.close()
    finish(args, results)


def finish(args, results: dict) -> None:
    if args.agree_with and args.agree_with.exists():
        other = json.loads(args.agree_with.read_text()).get("fast_greedy_tokens") or []
        mine = results.get("fast_greedy_tokens") or []
        results["greedy_agreement"] = {
            "with": str(args.agree_with),
            "leading": leading_agreement(other, mine),
            "of": min(len(other), len(mine)),
        }
    write_results(args, results)


def write_results(args, results: dict) -> None:
    """The table, and the JSON to --out; the token lists stay out of both."""
    for r in results["rows"]:
        r.pop("tokens", None)
    print_table(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        say(f"wrote {args.out}")


def model_config(shape: str):
    """The transformers config of `--shape`: a Falcon, or a Llama-layout model (Falcon3)."""
    from transformers import AutoConfig, FalconConfig

    values = dict(SHAPES[shape])
    if values.get("model_type") == "llama":
        return AutoConfig.for_model(values.pop("model_type"), initializer_range=0.02, **values)
    return FalconConfig(
        vocab_size=65024,
        parallel_attn=True,
        bias=False,
        alibi=False,
        max_position_embeddings=2048,
        **values,
    )


falcon_config = model_config  # the name the tensor-parallel benchmarks import


def model_bytes(config) -> int:
    """bf16 bytes of the model's weights, tied ones once."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    return sum(p.numel() for p in model.parameters()) * 2  # parameters(): each tied one once


def weight_floor(model, bandwidth: float, results: dict) -> float:
    """ms a token cannot beat: the bytes one step must read (every weight once; of an untied
    embedding table only the token's row) over the measured copy bandwidth."""
    read = unique_bytes(model)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if embed.data_ptr() != head.data_ptr():
        read -= (embed.shape[0] - 1) * embed.shape[1] * embed.element_size()
    floor_ms = read / bandwidth * 1e3
    results.update(weight_read_GB=read / 1e9, floor_ms=floor_ms)
    say(
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; a token reads {read / 1e9:.2f} GB of weights; "
        f"floor {floor_ms:.2f} ms/token"
    )
    return floor_ms


def step_bytes(layout) -> int:
    """Bytes one decode step reads of the weights in `layout` (one rank's, under tensor
    parallelism): every product's kept tensors as packed, the norms, one row of the embedding."""
    import torch

    tensors = [layout.embed[0], *layout.lm_head, *layout.ln_f]
    for layer in layout.layers:
        for kept in (layer.w_in, layer.w_mlp_in, layer.w_out, layer.w_mlp_out, layer.ln_attn, layer.ln_mlp):
            tensors += kept or ()
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def gpu_memory_used() -> dict:
    """MB of memory in use on each GPU, every process's (nvidia-smi); empty where there is none."""
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {
        f"GPU {i.strip()}": f"{int(mb)} MiB"
        for i, mb in (line.split(",") for line in out.strip().splitlines())
    }


def build_model_across_gpus(config, device: str):
    """The model spread over every visible GPU as `device_map="auto"` spreads it, random weights."""
    import torch
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory, set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    from bench.random_weights import RandomSource

    # Untied: accelerate places the head on the last GPU and the embedding on the first (the same
    # values, from the same source; a token reads the head whole and one row of the embedding).
    untied = config.__class__(**{**config.to_dict(), "tie_word_embeddings": False})
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(untied).eval()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    no_split = list(model._no_split_modules)
    memory = get_balanced_memory(model, dtype=dtype, no_split_module_classes=no_split)
    placement = infer_auto_device_map(model, max_memory=memory, dtype=dtype, no_split_module_classes=no_split)
    sources: dict = {}  # the seeded weights the tensor-parallel runs hold, so their tokens compare
    for name, _ in model.named_parameters():
        owner = max((m for m in placement if name == m or name.startswith(m + ".") or m == ""), key=len)
        target = placement[owner] if device == "cuda" else "cpu"
        target = f"cuda:{target}" if isinstance(target, int) else target
        if target not in sources:
            sources[target] = RandomSource(config, target, dtype)
        source = sources[target]
        embed = (
            "model.embed_tokens.weight"
            if config.model_type == "llama"
            else "transformer.word_embeddings.weight"
        )
        value = source.read(name if source.has(name) else embed)
        set_module_tensor_to_device(model, name, target, value=value, dtype=dtype)
    say(f"device_map: {sorted(set(map(str, placement.values())))}")
    return dispatch_model(model, device_map=placement)


# -- measurements ---------------------------------------------------------------------------------


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read and written."""
    import torch

    n = (1 << 30) if device == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        start = now(device)
        dst.copy_(src)
        times.append(now(device) - start)
    return 2 * n / statistics.median(times)


def bench_plain(model, tokenizer, prompt, long_prompt, args, rows, floor_ms):
    """Plain generate: decode ms/token from (time of N tokens - time of 1) / (N - 1); TTFT."""
    import torch
    from transformers import TextIteratorStreamer

    device = model.device.type
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
    long_ids = tokenizer(long_prompt, return_tensors="pt")["input_ids"].to(model.device)

    def generate(input_ids, n, **kwargs):
        with torch.inference_mode():
            return model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                **kwargs,
            )

    generate(ids, 8)
    ttft = median_time(lambda: generate(ids, 1), device)
    ttft_long = median_time(lambda: generate(long_ids, 1), device)
    start = now(device)
    out = generate(ids, args.new_tokens)
    total = now(device) - start
    tokens = out[0, ids.shape[-1] :].tolist()
    ms = (total - ttft) / (args.new_tokens - 1) * 1e3
    rows.append(row("plain generate", ms, floor_ms, ttft, ttft_long))
    say(f"plain generate: {ms:.2f} ms/token, TTFT {ttft * 1e3:.1f} ms")

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=600)
    stamps = []
    start = now(device)
    thread = threading.Thread(target=generate, args=(ids, args.new_tokens), kwargs={"streamer": streamer})
    thread.start()
    for _ in streamer:
        stamps.append(time.perf_counter())
    thread.join()
    end = time.perf_counter()
    first = stamps[0] - start if stamps else float("nan")
    ms = (end - stamps[0]) / (args.new_tokens - 1) * 1e3 if stamps else float("nan")
    rows.append(row("plain generate + TextIteratorStreamer", ms, floor_ms, first))
    say(f"plain + streamer: {ms:.2f} ms/token")
    return tokens


def bench_stream(backend, label, prompt, long_prompt, args, floor_ms, runs):
    """Through LocalBackend.stream: queueing, detokenizing and our streaming included."""
    from chat.conversation.params import GenerationParams

    params = GenerationParams(temperature=0.0, max_new_tokens=args.new_tokens, stop_sequences=("\x00",))
    per_token, ttfts = [], []
    for _ in range(runs):
        start = time.perf_counter()
        stamps = [time.perf_counter() for token in backend.stream(prompt, params) if token.id is not None]
        ttfts.append(stamps[0] - start)
        per_token.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
    long_ttfts = []
    for _ in range(runs):
        start = time.perf_counter()
        stream = backend.stream(long_prompt, params.with_max_new_tokens(1))
        next(stream)
        long_ttfts.append(time.perf_counter() - start)
        stream.close()
    r = row(
        label,
        statistics.median(per_token) * 1e3,
        floor_ms,
        statistics.median(ttfts),
        statistics.median(long_ttfts),
    )
    say(f"{label}: {r['ms_per_token']:.2f} ms/token, TTFT {r['ttft_ms']:.1f} / {r['ttft_long_ms']:.1f} ms")
    return r


def bench_bare(backend, decoder, ids, params, label, floor_ms, seed=0):
    """The decoder alone, on the worker thread: per-token time from emit timestamps."""

    def run():
        stamps, tokens = [], []

        def emit(token):
            stamps.append(time.perf_counter())
            tokens.append(token)

        start = time.perf_counter()
        decoder.generate(ids, params, seed, emit, lambda: False)
        return start, stamps, tokens

    start, stamps, tokens = backend.call_on_worker(run)
    ms = (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3
    r = row(label, ms, floor_ms, stamps[0] - start)
    r["tokens"] = tokens
    if label:
        say(f"{label}: {ms:.3f} ms/token ({len(tokens)} tokens)")
    return r


def check_attention(decoder) -> dict:
    """The decoder's flash kernels on its own layer-0 cache (filled by the last reply) and random
    queries, against float64 attention; the torch path's bf16 error beside it."""
    import torch

    from chat.engine.attention import attend_reference

    layer = decoder.layers[0]
    k, v = layer.k_cache, layer.v_cache
    filled = int(decoder.pos)
    worst = {"flash": 0.0, "torch": 0.0}
    for position in (0, 1, 64, filled // 2, filled):
        q = torch.randn(decoder.kv_heads, decoder.group, decoder.head_dim, dtype=decoder.dtype, device="cuda")
        pos = torch.tensor([position], device="cuda")
        positions = torch.arange(decoder.max_len, device="cuda")
        exact = torch.empty(q.numel(), dtype=torch.float64, device="cuda")
        attend_reference(q.double(), k.double(), v.double(), pos, positions, exact)
        flash = torch.full((1, q.numel()), float("nan"), dtype=decoder.dtype, device="cuda")
        decoder.flash(q, k, v, pos, flash)
        plain = torch.empty(q.numel(), dtype=decoder.dtype, device="cuda")
        attend_reference(q, k, v, pos, positions, plain)
        for name, out in (("flash", flash[0]), ("torch", plain)):
            error = ((out.double() - exact).norm() / exact.norm()).item()  # NaN if a write was missed
            worst[name] = error if error != error else max(worst[name], error)
    return {"positions_up_to": filled, "max_relative_error": worst}


def matmuls_alone_ms(decoder) -> float:
    """Only the step's matrix products (the fused layout, its `products` adapter), in one CUDA graph."""
    import torch

    layout = decoder.layout
    linear = layout.products.linear
    x = torch.randn(1, layout.hidden, dtype=decoder.dtype, device="cuda")
    wide = torch.randn(1, layout.joined_size, dtype=decoder.dtype, device="cuda")

    hidden = torch.randn(1, layout.ffn, dtype=decoder.dtype, device="cuda")

    def products():
        for layer in layout.layers:
            linear(x, *layer.w_in)
            if layer.w_mlp_in is not None:
                linear(x, *layer.w_mlp_in)
            linear(wide, *layer.w_out)
            if layer.w_mlp_out is not None:
                linear(hidden, *layer.w_mlp_out)
        linear(x, *layout.lm_head)

    return graph_ms(products)


def graph_ms(function, replays: int = 50, *, warm_ups: int = 1, repeats: int = 1) -> float:
    """Milliseconds per call of `function` replayed from a CUDA graph: `warm_ups` calls off the
    capture first (compiling, autotuning), then the median of `repeats` timings of `replays`."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(warm_ups):
            function()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        function()
    times = []
    for _ in range(repeats):
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return statistics.median(times)


def profile_step(decoder, replays: int = 20, run=None) -> dict:
    """Where the step's GPU time goes: kernel time by kind, from the profiler over graph replays
    (or over `run()`, which makes `replays` tokens: under tensor parallelism the other ranks
    replay only as rank 0's replies tell them)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if run is None:
        graph = decoder._graphs[True]
        graph.replay()
        torch.cuda.synchronize()

        def run():
            for _ in range(replays):
                graph.replay()

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    kernels = []
    for event in prof.key_averages():
        us = (
            event.device_time_total / replays
            if hasattr(event, "device_time_total")
            else event.cuda_time_total / replays
        )
        if us <= 0:
            continue
        kernels.append((event.key[:90], us, event.count // replays))
        kinds[kernel_kind(event.key)] = kinds.get(kernel_kind(event.key), 0.0) + us
    kernels.sort(key=lambda k: -k[1])
    say(
        "profile of one greedy step (GPU us per token, by kind): "
        + ", ".join(f"{k} {v:.0f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
    )
    for name, us, count in kernels[:15]:
        say(f"  {us:9.1f} us  x{count:<4} {name}")
    return {
        "by_kind_us": kinds,
        "top_kernels": [{"name": n, "us": u, "count": c} for n, u, c in kernels[:25]],
    }


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    if "_pack_x" in lowered or "_sum_splits" in lowered:
        return "int4 GEMV's x packing and split-K sums"
    if any(
        word in lowered
        for word in ("gemv", "gemm", "cutlass", "sm90_xmma", "nvjet", "splitk", "matmul", "_rows")
    ):
        return "matrix products"
    if any(word in lowered for word in ("fmha", "attention", "flash", "softmax", "merge_chunks")):
        return "attention"
    if "nccl" in lowered:
        return "all-reduce / all-gather (NCCL)"
    if "rotate_store" in lowered:
        return "rotary, cache write, GELU"
    if "triton" in lowered:
        return "fused elementwise (triton)"
    return "other"


# -- helpers --------------------------------------------------------------------------------------


def build_model(shape: str, device: str):
    """A model of the given shape with random bf16 weights made on the GPU, and a word tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model_config(shape)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    start = time.perf_counter()
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config).eval()
    finally:
        torch.set_default_dtype(default)
    say(
        f"built {shape} {config.model_type} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return model, word_tokenizer(config.vocab_size)


def word_tokenizer(vocab: int):
    """One word per token, `w0` .. `w{vocab-1}`: prompts of an exact length, any id decodable."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words, model_input_names=["input_ids", "attention_mask"])


def prompt_text(tokens: int, seed: int) -> str:
    import random

    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(1, 65024)}" for _ in range(tokens))


def unique_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def median_time(function, device, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        start = now(device)
        function()
        times.append(now(device) - start)
    return statistics.median(times)


def now(device: str) -> float:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


def leading_agreement(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def row(label, ms, floor_ms, ttft_s=None, ttft_long_s=None) -> dict:
    return {
        "label": label,
        "ms_per_token": ms,
        "tokens_per_s": 1e3 / ms,
        "ratio_to_floor": ms / floor_ms,
        "ttft_ms": None if ttft_s is None else ttft_s * 1e3,
        "ttft_long_ms": None if ttft_long_s is None else ttft_long_s * 1e3,
    }


def print_table(results: dict) -> None:
    say("")
    say(
        f"{results['device']}, {results['shape']} shape, {results.get('weights', 'random bf16')}, batch 1, "
        f"{results['prompt_tokens']}-token prompt, {results['new_tokens']} new tokens "
        f"(copy {results['copy_bandwidth_GBps'] / 1e3:.2f} TB/s, weights {results['weight_GB']:.2f} GB)"
    )
    say("| path | ms/token | tokens/s | x floor | TTFT 128 (ms) | TTFT 1024 (ms) |")
    say("| --- | ---: | ---: | ---: | ---: | ---: |")
    fmt = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
    plain = next((r for r in results["rows"] if r["label"] == "plain generate"), None)
    for r in results["rows"]:
        say(
            f"| {r['label']} | {r['ms_per_token']:.2f} | {r['tokens_per_s']:.0f} | {r['ratio_to_floor']:.2f} | "
            f"{fmt(r['ttft_ms'])} | {fmt(r['ttft_long_ms'])} |"
        )
    fast = next((r for r in results["rows"] if r["label"] == "LocalBackend.stream, fast decoder"), None)
    if plain and fast:
        say(
            f"speed-up of LocalBackend.stream (fast) over plain generate: {plain['ms_per_token'] / fast['ms_per_token']:.2f}x"
        )
    for key in (
        "goals",
        "int4_products",
        "int4_quantize_s",
        "int4_warm_up_s",
        "greedy_agreement",
        "greedy_repeatable",
        "seeded_sampling_reproducible",
        "fast_warm_up_s",
        "compile_mode",
        "fast_decoder",
        "tensor_parallel",
        "device_map",
        "load",
        "gpu_memory_ready",
        "gpu_memory_end",
    ):
        if key in results:
            say(f"{key}: {results[key]}")


def say(text: str) -> None:
    print(text, flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
