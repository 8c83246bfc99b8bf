"""How many prompt-lookup proposals a real model accepts: SmolLM2-135M-Instruct on the CPU.

    python bench/speculation_acceptance.py --out bench/results/speculation-acceptance-smollm2.json

Three conversations in the model's chat template (bench/data holds their texts): a chat whose new
request repeats an earlier reply, a code edit (a function with a variable renamed; the reply is
started with a code fence, as a code assistant's would be) and a summary of a passage. Each is
decoded greedily by the fast decoder with prompt lookup (chat/engine/speculation.py) and, as the
baseline, by transformers' `generate`: the tokens must be equal. The table gives tokens per
step after the first token (which the prompt's pass gives; a plain step gives 1), proposals
accepted, and the acceptance per proposal tried (a proposal after a rejected one is not tried).
Wall times are printed too, but on 2 busy cores in eager float32 they say little about a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DATA = Path(__file__).resolve().parent / "data"
CHAT = [
    {"role": "user", "content": "I am planning a picnic in the park on Saturday. What should I bring?"},
    {
        "role": "assistant",
        "content": "For a picnic in the park on Saturday, bring: 1. A blanket to sit on. 2. Sandwiches and "
        "fruit. 3. Water and juice. 4. Sunscreen and hats. 5. A bag for rubbish. 6. A frisbee or a ball "
        "for games.",
    },
    {"role": "user", "content": "Thanks! Can you repeat the list, but add one more thing for rainy weather?"},
]


def tasks() -> dict[str, tuple[list[dict], str]]:
    """name -> (messages, the start of the assistant's reply)."""
    code = (DATA / "speculation_code.py.txt").read_text()
    passage = (DATA / "speculation_passage.txt").read_text().strip()
    return {
        "chat": (CHAT, ""),
        "code edit": (
            [
                {
                    "role": "user",
                    "content": "Rename the variable `total` to `running_sum` in this function and reply with "
                    f"the whole function:\n\n```python\n{code}```",
                }
            ],
            "```python\n",
        ),
        "summary": (
            [
                {
                    "role": "user",
                    "content": f"Summarize this text in three sentences, reusing its own words:\n\n{passage}",
                }
            ],
            "",
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chat.conversation.params import GenerationParams
    from chat.engine.decode_loop import FastDecoder
    from chat.engine.speculation import PromptLookup
    from tests.real_model import ensure_smollm2

    folder = ensure_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def load():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    model = load()
    params = GenerationParams(temperature=0.0, max_new_tokens=args.new_tokens)
    decoder = FastDecoder(load(), tokenizer, max_len=2048)
    decoder.speculate(PromptLookup())
    results = {"command": " ".join(sys.argv), "model": folder.name, "rows": []}
    print(f"SmolLM2-135M-Instruct on the CPU, greedy, up to {args.new_tokens} new tokens", flush=True)
    for name, (messages, start) in tasks().items():
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + start
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        began = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.eos_token_id,
            )
        reference = out[0, ids.shape[1] :].tolist()
        generate_s = time.perf_counter() - began
        tokens = []
        began = time.perf_counter()
        decoder.generate(ids, params, 0, tokens.append, lambda: False)
        fast_s = time.perf_counter() - began
        stats = decoder.speculation
        row = {
            "task": name,
            "prompt_tokens": ids.shape[1],
            "new_tokens": len(tokens),
            "equal_to_generate": tokens == reference,
            "steps": stats.steps + stats.plain_steps,
            "verify_steps": stats.steps,
            # the first token comes with the prompt's pass
            "tokens_per_step": (len(tokens) - 1) / max(stats.steps + stats.plain_steps, 1),
            "proposed": stats.proposed,
            "accepted": stats.accepted,
            "acceptance": stats.acceptance,
            "generate_s": generate_s,
            "fast_s": fast_s,
            "reply_start": tokenizer.decode(tokens[:60]),
        }
        results["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "reply_start"}), flush=True)
    print(table(results["rows"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


def table(rows: list[dict]) -> str:
    """The rows as docs/performance.md shows them."""
    lines = [
        "| task | prompt tokens | new tokens | steps | tokens per step | accepted / proposed | "
        "acceptance per proposal tried | same as generate |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        acceptance = f"{r['acceptance']:.0%}" if r["acceptance"] is not None else "-"
        lines.append(
            f"| {r['task']} | {r['prompt_tokens']} | {r['new_tokens']} | {r['steps']} | "
            f"{r['tokens_per_step']:.2f} | {r['accepted']} / {r['proposed']} | {acceptance} | "
            f"{'yes' if r['equal_to_generate'] else 'no'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
