"""Memory plan for Falcon shapes: weights, KV cache per conversation, GPUs needed, decode floor.

Counts parameters exactly by building the model on PyTorch's meta device (no memory is used), so
the figures follow transformers' own Falcon implementation. Run: `python bench/memory_plan.py`.
"""

from __future__ import annotations

import argparse
import json
import math

SHAPES = {
    "falcon-7b": dict(
        hidden_size=4544,
        num_hidden_layers=32,
        num_attention_heads=71,
        multi_query=True,
        new_decoder_architecture=False,
        vocab_size=65024,
    ),
    "falcon-40b": dict(
        hidden_size=8192,
        num_hidden_layers=60,
        num_attention_heads=128,
        num_kv_heads=8,
        new_decoder_architecture=True,
        vocab_size=65024,
    ),
    "falcon-180b": dict(
        hidden_size=14848,
        num_hidden_layers=80,
        num_attention_heads=232,
        num_kv_heads=8,
        new_decoder_architecture=True,
        vocab_size=65024,
    ),
}
GPUS = {"H100 80GB": (80e9, 3.0e12), "H200 141GB": (141e9, 4.27e12)}  # memory, measured copy B/s
BYTES_PER_PARAM = {"bf16": 2.0, "8bit": 1.0, "4bit": 0.5 + 0.03}  # nf4 plus its block scales
CONTEXT_TOKENS = 2048
# What a GPU needs beyond weights: CUDA context, allocator slack and activations (~8 GB), and the
# KV cache of the conversations it serves.
RESERVED_BYTES = 8e9


def parameters(shape: dict) -> int:
    import torch
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(parallel_attn=True, bias=False, alibi=False, **shape)
    with torch.device("meta"):
        model = FalconForCausalLM(config)
    return sum(p.numel() for p in model.parameters())  # tied embeddings counted once


def kv_bytes_per_token(shape: dict, bytes_per_value: int = 2) -> int:
    heads = shape["num_attention_heads"]
    kv_heads = 1 if shape.get("multi_query") else shape.get("num_kv_heads", heads)
    head_dim = shape["hidden_size"] // heads
    return 2 * shape["num_hidden_layers"] * kv_heads * head_dim * bytes_per_value


def plan(name: str, conversations: int) -> dict:
    shape = SHAPES[name]
    params = parameters(shape)
    kv_conversation = kv_bytes_per_token(shape) * CONTEXT_TOKENS
    rows = {}
    for precision, per_param in BYTES_PER_PARAM.items():
        weights = params * per_param
        need = weights + conversations * kv_conversation
        for gpu, (memory, bandwidth) in GPUS.items():
            count = math.ceil(need / (memory - RESERVED_BYTES))
            rows[f"{precision} on {gpu}"] = {
                "weights_gb": round(weights / 1e9, 1),
                "gpus": count,
                # device_map="auto" runs the GPUs one after another: a token still reads every
                # weight once at one GPU's bandwidth, however many GPUs hold them.
                "floor_ms_per_token_pipeline": round(weights / bandwidth * 1e3, 1),
                "floor_ms_per_token_tensor_parallel": round(weights / bandwidth / count * 1e3, 1),
            }
    return {
        "model": name,
        "parameters": params,
        "kv_cache_per_token_kib": kv_bytes_per_token(shape) / 1024,
        "kv_cache_per_2048_token_conversation_mb": round(kv_conversation / 1e6, 1),
        "conversations_budgeted": conversations,
        "layouts": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=SHAPES, action="append")
    parser.add_argument("--conversations", type=int, default=8, help="KV caches to budget for")
    parser.add_argument("--json", help="also write the plan here")
    args = parser.parse_args()
    plans = [plan(name, args.conversations) for name in args.model or ["falcon-40b", "falcon-180b"]]
    for p in plans:
        print(
            f"\n{p['model']}: {p['parameters'] / 1e9:.2f} B parameters; KV cache "
            f"{p['kv_cache_per_token_kib']:.0f} KiB/token, "
            f"{p['kv_cache_per_2048_token_conversation_mb']} MB per {CONTEXT_TOKENS}-token conversation "
            f"({p['conversations_budgeted']} budgeted)"
        )
        print("| layout | weights GB | GPUs | floor ms/token, device_map | floor ms/token, tensor parallel |")
        print("|---|---|---|---|---|")
        for layout, row in p["layouts"].items():
            print(
                f"| {layout} | {row['weights_gb']} | {row['gpus']} | "
                f"{row['floor_ms_per_token_pipeline']} | {row['floor_ms_per_token_tensor_parallel']} |"
            )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(plans, out, indent=2)


if __name__ == "__main__":
    main()
