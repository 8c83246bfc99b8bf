"""int4 fast path against its floor and against the bf16 fast path, through LocalBackend.stream.

    PYTHONUNBUFFERED=1 python bench/int4_decode.py --shapes 180b 40b 7b --load-7b --out-dir bench/results

- 180b: Falcon-180B's shape with random weights made directly in int4 (the bf16 model would be
  357 GB): ms/token against the int4 floor (bytes the step reads / copy bandwidth, same run),
  time to first token for a 1,900-token prompt, and a whole 2,048-token conversation (prompt +
  reply filling the cache), with peak GPU memory.
- 40b, 7b: the same random bf16 model served by the bf16 fast path, then quantized to int4
  (the `products` seam of layout.py) and served again: the two in one run.
- --load-7b: a random Falcon-7B written to disk in Falcon's shard layout (two safetensors
  shards, ~10 GB each at most), then `--quantize int4` loading (a weight at a time onto the GPU,
  quantized, packed and saved as it comes) timed with its peak GPU memory; reloading the saved
  folder; bf16 loading beside.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_decode import (
    SHAPES,
    bench_stream,
    build_model,
    copy_bandwidth,
    prompt_text,
    row,
    say,
    step_bytes,
)

SHAPE_180B = dict(SHAPES["180b"])  # a copy: the CPU smoke run shrinks it
VOCAB = 65024
DEVICE = "cuda"
ADAPTERS = {"tinygemm": "Int4TinyGemm", "triton": "Int4Triton"}  # int4_products' classes


def adapter(kernel: str):
    from chat.engine.int4 import products as int4_products

    return getattr(int4_products, ADAPTERS[kernel])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=["180b", "40b", "7b"])
    parser.add_argument("--load-7b", action="store_true")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--long-prompt-tokens", type=int, default=1900)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    parser.add_argument("--int4-kernels", nargs="+", default=["tinygemm", "triton"], choices=list(ADAPTERS))
    parser.add_argument(
        "--pick-from", type=Path, help="bench/int4_kernels.py JSON: 180b takes its fastest kernel"
    )
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():  # a smoke test of the script on the CPU: --shapes tiny
        return cpu_smoke(args)
    # Each decoder compiles its step again; an app builds one, this script up to six.
    torch._dynamo.config.recompile_limit = 64
    device = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth(DEVICE)
    say(f"{device}, torch {torch.__version__}, copy {bandwidth / 1e12:.2f} TB/s")
    tag = "h200" if "H200" in device else "h100"
    for shape in args.shapes:
        results = {
            "command": " ".join(sys.argv),
            "device": device,
            "torch": torch.__version__,
            "shape": shape,
            "copy_TBps": bandwidth / 1e12,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "rows": [],
        }
        if shape == "180b":
            bench_180b(args, bandwidth, results)
        else:
            bench_against_bf16(shape, args, bandwidth, results)
        write(args.out_dir / f"{tag}-int4-falcon{shape}.json", results)
        gc.collect()
        torch.cuda.empty_cache()
    if args.load_7b:
        results = {"command": " ".join(sys.argv), "device": device, "torch": torch.__version__}
        bench_load(results)
        write(args.out_dir / f"{tag}-int4-load-7b.json", results)


def cpu_smoke(args) -> None:
    ADAPTERS.update(tinygemm="Int4Reference")  # the CPU's int4 products
    args.int4_kernels = ["tinygemm", "triton"]
    results = {"rows": []}
    args.long_prompt_tokens = 24
    bench_against_bf16("tiny", args, 1e10, results, device="cpu")
    global DEVICE
    DEVICE = "cpu"
    SHAPE_180B.update(hidden_size=512, num_hidden_layers=2, num_attention_heads=8, num_kv_heads=2)
    args.new_tokens, args.long_prompt_tokens = 4, 2040
    bench_180b(args, 1e10, results)
    say(json.dumps(results, indent=1))


def bench_180b(args, bandwidth, results) -> None:
    """Each kernel of --int4-kernels in turn, on the same seeded random int4 weights."""
    import gc

    import torch

    floor_row = None
    for kernel in pick_kernels(args, "180b"):
        torch.manual_seed(0)
        mine = {"rows": []}
        bench_180b_with(args, bandwidth, mine, kernel)
        floor_row = floor_row or mine["rows"][0]
        results["rows"] += mine["rows"][1:]
        results.setdefault("kernels", {})[kernel] = {k: v for k, v in mine.items() if k != "rows"}
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    results["rows"].insert(0, floor_row)


def bench_180b_with(args, bandwidth, results, kernel) -> None:
    import torch
    from transformers import FalconConfig

    from bench.random_weights import RandomSource
    from chat.backends.local.backend import LocalBackend
    from chat.engine.build import Engine
    from chat.engine.decode_loop import FastDecoder
    from chat.engine.weights import lay_out

    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    config = FalconConfig(
        vocab_size=VOCAB,
        parallel_attn=True,
        bias=False,
        alibi=False,
        max_position_embeddings=2048,
        **SHAPE_180B,
    )
    # Every product drawn directly in int4 at the shape and group the layout asks for.
    source = RandomSource(config, DEVICE, torch.bfloat16 if DEVICE == "cuda" else torch.float32, int4=True)
    results["kernel"] = kernel
    layout = lay_out(source, max_len=2048, products=adapter(kernel), quantize="hqq")
    read = step_bytes(layout)
    floor_ms = read / bandwidth * 1e3
    results.update(weights_read_GB=read / 1e9, floor_ms=floor_ms, built_s=time.perf_counter() - start)
    if kernel == "triton":
        from chat.engine.int4 import gemv as int4_gemv

        results["tuned"] = {str(key[1:3]): str(c) for key, c in int4_gemv._chosen.items()}
    say(
        f"180b int4 ({kernel}): {read / 1e9:.1f} GB read per token; floor {floor_ms:.2f} ms; "
        f"built in {results['built_s']:.0f} s {results.get('tuned', '')}"
    )
    results["rows"].append(row("int4 floor (bytes read / copy bandwidth)", floor_ms, floor_ms))
    tokenizer = word_tokenizer()
    start = time.perf_counter()
    decoder = FastDecoder.from_layout(layout, tokenizer.eos_token_id)
    backend = LocalBackend(Engine(tokenizer, decoder, 2048, "bench"), model_name="bench")
    results["warm_up_s"] = time.perf_counter() - start
    say(f"warm-up (compile + capture) {results['warm_up_s']:.0f} s; decoder {backend.decoder.name}")
    prompt, long_prompt = prompt_text(args.prompt_tokens, 1), prompt_text(args.long_prompt_tokens, 2)
    results["rows"].append(
        bench_stream(
            backend, f"LocalBackend.stream, int4 fast path ({kernel})", prompt, long_prompt, args, floor_ms, 3
        )
    )
    results["conversation_2048"] = conversation(backend, long_prompt, 2048 - args.long_prompt_tokens)
    results["peak_GB"] = torch.cuda.max_memory_allocated() / 1e9 if DEVICE == "cuda" else 0.0
    say(
        f"2,048-token conversation: {results['conversation_2048']}; peak GPU memory {results['peak_GB']:.1f} GB"
    )
    backend.close()
    del backend, decoder, layout


def pick_kernels(args, shape: str) -> list[str]:
    """With --pick-from (bench/int4_kernels.py's JSON): the fastest kernel on this shape's layer;
    else every kernel of --int4-kernels."""
    if not args.pick_from or not args.pick_from.exists():
        return args.int4_kernels
    rows = json.loads(args.pick_from.read_text())["rows"]
    timed = {
        r["kernel"]: r["us_per_layer"]
        for r in rows
        if r.get("shape") == shape and r.get("part") == "layer" and "us_per_layer" in r
    }
    candidates = [k for k in args.int4_kernels if k in timed]
    kernel = min(candidates, key=timed.get) if candidates else args.int4_kernels[0]
    say(f"{shape} int4 kernel: {kernel} (kernel bench, us per layer: {timed})")
    return [kernel]


def bench_against_bf16(shape, args, bandwidth, results, device=DEVICE) -> None:
    import torch

    from chat.backends.local.backend import LocalBackend
    from chat.engine.build import Engine
    from chat.engine.decode_loop import FastDecoder
    from chat.engine.weights import ModelSource, lay_out

    model, tokenizer = build_model(shape, device)
    prompt, long_prompt = (
        prompt_text(args.prompt_tokens, 1),
        prompt_text(min(1024, args.long_prompt_tokens), 2),
    )
    kernels = pick_kernels(args, shape)
    runs = [("bf16", None)] + [(f"int4 {k}", adapter(k)) for k in kernels]
    for label, products in runs:
        start = time.perf_counter()
        if products is None:
            decoder = FastDecoder(model, tokenizer, max_len=2048)
        else:
            layout = lay_out(ModelSource(model), max_len=2048, products=products, quantize="hqq")
            results[f"{label}_quantize_s"] = time.perf_counter() - start
            decoder = FastDecoder.from_layout(layout, tokenizer.eos_token_id)
            del layout
        read = step_bytes(decoder.layout)
        floor_ms = read / bandwidth * 1e3
        results[f"{label}_weights_read_GB"], results[f"{label}_floor_ms"] = read / 1e9, floor_ms
        engine = Engine.of_model(model, tokenizer, context_length=2048, decoder=decoder)
        backend = LocalBackend(engine, model_name="bench")
        results[f"{label}_warm_up_s"] = time.perf_counter() - start
        say(
            f"{shape} {label}: {read / 1e9:.2f} GB read per token, floor {floor_ms:.2f} ms; ready in "
            f"{results[f'{label}_warm_up_s']:.0f} s ({backend.decoder.name})"
        )
        results["rows"].append(row(f"{label} floor", floor_ms, floor_ms))
        results["rows"].append(
            bench_stream(
                backend, f"LocalBackend.stream, {label} fast path", prompt, long_prompt, args, floor_ms, 3
            )
        )
        backend.close()
        del backend, decoder
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    rows = {r["label"]: r for r in results["rows"]}
    bf16 = rows["LocalBackend.stream, bf16 fast path"]
    for kernel in kernels:
        q = rows[f"LocalBackend.stream, int4 {kernel} fast path"]
        results[f"int4 {kernel} speed-up (tokens/s)"] = speedup = bf16["ms_per_token"] / q["ms_per_token"]
        say(
            f"{shape}: int4 {kernel} {q['ms_per_token']:.2f} ms/token vs bf16 {bf16['ms_per_token']:.2f}: {speedup:.2f}x"
        )


def bench_load(results) -> None:
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    folder, saved = Path("/tmp/falcon7b-synthetic"), Path("/tmp/falcon7b-int4")
    model, tokenizer = build_model("7b", DEVICE)
    start = time.perf_counter()
    model.save_pretrained(folder, max_shard_size="10GB")
    tokenizer.save_pretrained(folder)
    results["write_checkpoint_s"] = time.perf_counter() - start
    results["shards"] = sorted(p.name for p in folder.glob("*.safetensors"))
    results["checkpoint_GB"] = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e9
    del model
    gc.collect()
    torch.cuda.empty_cache()

    def measure(label, load):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        loaded = load()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() - base) / 1e9
        held = (torch.cuda.memory_allocated() - base) / 1e9
        results[label] = {"s": seconds, "peak_GB": peak, "held_GB": held}
        say(f"{label}: {seconds:.1f} s, peak {peak:.1f} GB, held {held:.1f} GB")
        return loaded

    bf16 = measure(
        "bf16 from_pretrained",
        lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda"),
    )
    del bf16
    gc.collect()
    torch.cuda.empty_cache()
    # What the app does: each weight read, quantized (HQQ) and packed for the GEMV (each new shape
    # tuned), the int4 weights saved as they are made (--save-quantized).
    from chat.engine.int4.products import int4_products
    from chat.engine.int4.saved import Int4Writer
    from chat.engine.weights import CheckpointSource, lay_out

    products = int4_products(DEVICE)
    results["int4 products"] = products.name

    def quantize_and_save():
        source = CheckpointSource(folder, device=DEVICE, dtype=torch.bfloat16)
        writer = Int4Writer(saved)
        layout = lay_out(source, max_len=2048, products=products, quantize="hqq", save=writer)
        writer.finish(source.config, folder)
        return layout

    layout = measure("int4 quantize while loading, packed, tuned and saved", quantize_and_save)
    del layout
    results["int4 folder GB"] = sum(p.stat().st_size for p in saved.glob("*.safetensors")) / 1e9
    gc.collect()
    torch.cuda.empty_cache()
    reload = CheckpointSource(saved, device=DEVICE, dtype=torch.bfloat16)
    measure(
        "int4 reload of the saved folder, packed",
        lambda: lay_out(reload, max_len=2048, products=products, quantize="hqq"),
    )
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(saved, ignore_errors=True)


def conversation(backend, long_prompt, new_tokens) -> dict:
    """A prompt and a reply that together fill the 2,048-token cache."""
    from chat.conversation.params import GenerationParams

    params = GenerationParams(temperature=0.0, max_new_tokens=new_tokens, stop_sequences=("\x00",))
    start = time.perf_counter()
    tokens = [t for t in backend.stream(long_prompt, params) if t.id is not None]
    return {"new_tokens": len(tokens), "finish": "ok", "s": time.perf_counter() - start}


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words, model_input_names=["input_ids", "attention_mask"])


def write(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    say(f"wrote {path}")


if __name__ == "__main__":
    main()
