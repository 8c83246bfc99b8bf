"""Speculative decoding on one GPU: ms per generated token against acceptance, draft cost included.

    PYTHONUNBUFFERED=1 python bench/speculation_decode.py --target 180b --draft 7b --out bench/results/x.json
    PYTHONUNBUFFERED=1 python bench/speculation_decode.py --target falcon3-10b --draft falcon3-1b --out ...

Target and draft: random weights drawn directly in int4 at the models' shapes (bench/random_weights.py),
laid out for the fast decoder with our int4 products, 2,048-token caches. Measured in one run:

1. the baseline: the target without speculation, greedy, ms per token (emit timestamps);
2. the verify step's cost: each verify width's CUDA graph (k + 1 rows, acceptance included) and
   the one-token step's, replayed alone; the draft's one-token step beside them;
3. for each acceptance p: a proposer that proposes the target's own greedy tokens, each kept with
   probability p (bench/scripted_proposer.py), with and without the draft model's real steps
   (it runs k draft steps per verify step, then its proposals are replaced by the scripted ones):
   ms per generated token, the acceptance measured, tokens per step, and whether the tokens are
   the baseline's. Random weights accept nothing of a real draft, hence the script.

Issue #28's goal: 180B int4 at <= 15 ms a token at 70% acceptance with a 7B int4 draft (one H200).
Without a GPU, `--target tiny --draft tiny` runs the same on the CPU (eager, float32): a smoke run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_decode import (
    SHAPES,
    copy_bandwidth,
    model_config,
    prompt_text,
    say,
    step_bytes,
    word_tokenizer,
)

# Falcon3-1B (tiiuae/Falcon3-1B-Base: 18 layers, hidden 2048, 8 query / 4 KV heads of 256, MLP
# 8192), the draft of Falcon3-10B's family and tokenizer.
FALCON3_1B = dict(num_hidden_layers=18, hidden_size=2048, intermediate_size=8192, num_attention_heads=8)
SHAPES.setdefault("falcon3-1b", dict(SHAPES["falcon3-10b"], **FALCON3_1B))
ACCEPTANCES = (0.5, 0.6, 0.7, 0.8, 0.9)
MAX_LEN = 2048


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="180b", choices=SHAPES)
    parser.add_argument("--draft", default="7b", choices=SHAPES)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--acceptances", nargs="+", type=float, default=list(ACCEPTANCES))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch

    from bench.scripted_proposer import ScriptedProposer
    from chat.conversation.params import GenerationParams

    cuda = torch.cuda.is_available()
    if cuda:
        torch._dynamo.config.recompile_limit = 64  # two decoders, several verify widths
    bandwidth = copy_bandwidth("cuda") if cuda else 1e10
    results = {
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if cuda else "cpu (smoke run)",
        "torch": torch.__version__,
        "copy_TBps": bandwidth / 1e12,
        "target": args.target,
        "draft": args.draft,
    }
    say(f"{results['device']}, copy {bandwidth / 1e12:.2f} TB/s; target {args.target}, draft {args.draft}")
    start = time.perf_counter()
    target, vocab = decoder_of(args.target)
    draft, _ = decoder_of(args.draft, vocab=vocab)
    results["target_read_GB"], results["draft_read_GB"] = (
        step_bytes(target.layout) / 1e9,
        step_bytes(draft.layout) / 1e9,
    )
    floor_ms = step_bytes(target.layout) / bandwidth * 1e3
    results["target_floor_ms"] = floor_ms
    # One proposer object for the whole run: the verify graphs are captured once, with it.
    scripted = ScriptedProposer([], 0.0, vocab=vocab, draft=draft)
    target.speculate(scripted)
    target.warm_up()
    results["built_and_warmed_s"] = time.perf_counter() - start
    say(
        f"target reads {results['target_read_GB']:.1f} GB a token (floor {floor_ms:.2f} ms), draft "
        f"{results['draft_read_GB']:.2f} GB; built and warmed in {results['built_and_warmed_s']:.0f} s"
    )
    if cuda:
        results["peak_GB"] = torch.cuda.max_memory_allocated() / 1e9

    tokenizer = word_tokenizer(vocab)
    ids = tokenizer(prompt_text(args.prompt_tokens, 1), return_tensors="pt")["input_ids"]
    greedy = GenerationParams(temperature=0.0, max_new_tokens=args.new_tokens, stop_sequences=("\x00",))

    # 1. The baseline, and the reference tokens the scripted proposer proposes.
    target.speculate(None)
    baseline = timed_reply(target, ids, greedy)
    results["baseline"] = {k: v for k, v in baseline.items() if k != "tokens"}
    say(
        f"baseline: {baseline['ms_per_token']:.2f} ms/token ({baseline['ms_per_token'] / floor_ms:.2f}x floor)"
    )

    # 2. What a verify step costs against a one-token step (graphs alone), and a draft step.
    if cuda:
        steps = results["step_ms"] = {
            "one token": replay_ms(lambda: _at_middle(target, target._graphs[True])),
            "draft, one token": replay_ms(lambda: _at_middle(draft, draft._graphs[True])),
        }
        for width in target.widths:
            target.limit.fill_(width - 1)
            steps[f"verify, {width} rows"] = replay_ms(
                lambda w=width: _at_middle(target, target._verify_graphs[w, True])
            )
        say("step costs (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in steps.items()))

    # 3. ms per token against acceptance, with the draft's real steps and without.
    rows = results["rows"] = []
    for with_draft in (True, False):
        for p in args.acceptances:
            proposer = ScriptedProposer(
                baseline["tokens"], p, vocab=vocab, draft=draft if with_draft else None
            )
            target.speculate(proposer)  # the captured graphs serve it: the same kind (q one-hot)
            reply = timed_reply(target, ids, greedy)
            stats = target.speculation
            row = {
                "acceptance_asked": p,
                "with_draft": with_draft,
                "acceptance": stats.acceptance,  # per proposal tried (speculation.SpeculationStats)
                "accepted_of_proposed": stats.accepted / max(stats.proposed, 1),
                "tokens_per_step": (len(reply["tokens"]) - 1) / max(stats.steps + stats.plain_steps, 1),
                "ms_per_token": reply["ms_per_token"],
                "speed_up": baseline["ms_per_token"] / reply["ms_per_token"],
                "same_tokens_as_baseline": reply["tokens"] == baseline["tokens"],
                "leading_agreement": _agreement(reply["tokens"], baseline["tokens"]),
            }
            rows.append(row)
            say(json.dumps(row))
    print_table(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


def decoder_of(shape: str, vocab: int | None = None):
    """A FastDecoder over random int4 weights of `shape` (its vocabulary: the target's)."""
    import torch

    from bench.random_weights import RandomSource
    from chat.engine.decode_loop import FastDecoder
    from chat.engine.int4.products import int4_products
    from chat.engine.weights import lay_out

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    config = model_config(shape)
    if vocab is not None:
        config.vocab_size = vocab
    source = RandomSource(config, device, dtype, int4=True)
    layout = lay_out(source, max_len=MAX_LEN, products=int4_products(device), quantize="hqq")
    return FastDecoder.from_layout(layout, None), config.vocab_size


def timed_reply(decoder, ids, params) -> dict:
    """One greedy reply on this thread: ms per token after the first (emit timestamps)."""
    stamps, tokens = [], []

    def emit(token):
        stamps.append(time.perf_counter())
        tokens.append(token)

    decoder.generate(ids, params, 0, emit, lambda: False)
    return {"ms_per_token": (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3, "tokens": tokens}


def replay_ms(replay, replays: int = 20) -> float:
    """ms per call of `replay` (a graph replay and a fill), after two untimed calls."""
    import torch

    for _ in range(2):
        replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def _at_middle(decoder, graph) -> None:
    decoder.pos.fill_(MAX_LEN // 2)  # the same position every replay; what it writes is not read
    graph.replay()


def _agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def print_table(results: dict) -> None:
    base = results["baseline"]["ms_per_token"]
    say(
        f"\n{results['device']}: target {results['target']} int4, draft {results['draft']} int4; "
        f"baseline {base:.2f} ms/token, floor {results['target_floor_ms']:.2f}"
    )
    say(
        "| acceptance asked | measured | tokens / step | ms / token, draft steps | ms / token, free proposer |"
    )
    say("| ---: | ---: | ---: | ---: | ---: |")
    by = {(r["acceptance_asked"], r["with_draft"]): r for r in results["rows"]}
    for p in dict.fromkeys(r["acceptance_asked"] for r in results["rows"]):
        drafted, free = by.get((p, True)), by.get((p, False))
        measured = f"{drafted['acceptance']:.0%}" if drafted["acceptance"] is not None else "-"
        say(
            f"| {p:.0%} | {measured} | {drafted['tokens_per_step']:.2f} | "
            f"{drafted['ms_per_token']:.2f} ({drafted['speed_up']:.2f}x) | {free['ms_per_token']:.2f} ({free['speed_up']:.2f}x) |"
        )


if __name__ == "__main__":
    main()
