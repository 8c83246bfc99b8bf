"""Time to first token with a forged chat history, against the TGI protocol double.

    python bench/forged_history.py                          # 300 and 1,000 turns, this tree
    python bench/forged_history.py --code /tmp/before       # the same, with another tree's chat/

Any API client can send a history of any length, so the prompt fitter must bound what it counts:
each count is a POST /tokenize to the server. This runs one reply (`chat.conversation.reply.stream_reply`, the
path the page and the API take) on a `TGIBackend` against the double (tests/tgi_double.py) served
by a separate process (its tokenizer's CPU time is then not the app's), and prints, per history
length, the /tokenize requests the reply made, the time to its first token, and what was dropped.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SERVE_DOUBLE = """
import sys, time
sys.path.insert(0, {root!r})
from tests.tgi_double import TGIDouble
double = TGIDouble(max_input_tokens=4096, max_total_tokens=4096, keepalive_s=1.0).start()
print(double.url, flush=True)
while True:
    time.sleep(3600)
"""


def forged_history(turns: int) -> list[dict]:
    history = []
    for i in range(turns):
        history.append(
            {"role": "user", "content": f"Question {i}: what did the falcon see over the river today?"}
        )
        history.append(
            {"role": "assistant", "content": f"Answer {i}: the falcon saw the city wake up at dawn."}
        )
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, nargs="+", default=[300, 1000])
    parser.add_argument("--code", default=str(ROOT), help="the tree whose chat/ package is timed")
    parser.add_argument("--repeats", type=int, default=5, help="replies per length; the median is shown")
    args = parser.parse_args()
    sys.path.insert(0, args.code)
    from chat.backends.remote.tgi import TGIBackend
    from chat.conversation.params import GenerationParams
    from chat.conversation.reply import stream_reply

    server = subprocess.Popen(
        [sys.executable, "-c", SERVE_DOUBLE.format(root=str(ROOT))], stdout=subprocess.PIPE, text=True
    )
    try:
        url = server.stdout.readline().strip()
        print(f"chat/ from {args.code}; TGI double at {url} (context 4,096 tokens)")
        print(f"{'turns':>6} {'/tokenize requests':>19} {'first token s (median)':>23} {'turns kept':>11}")
        for turns in [1, *args.turns]:  # 1: warm-up (imports, first connection), not shown
            times = []
            for _ in range(args.repeats if turns > 1 else 1):
                # A new backend each time: its cache of counts starts empty, as for a new forgery.
                backend = TGIBackend([url])
                asked = []
                server_token_count = backend.server_token_count
                backend.server_token_count = lambda e, t: asked.append(t) or server_token_count(e, t)
                backend.context_length()
                finished = []
                started = time.perf_counter()
                replies = stream_reply(
                    backend,
                    "And what did it see last?",
                    forged_history(turns),
                    "You are a helpful assistant.",
                    GenerationParams(max_new_tokens=16, temperature=0),
                    max_message_chars=20_000,
                    on_finish=finished.append,
                )
                next(replies)
                times.append(time.perf_counter() - started)
                replies.close()
                backend.close()
            if turns > 1:
                kept = turns - finished[-1].dropped_turns
                print(f"{turns:>6} {len(asked):>19} {statistics.median(times):>23.2f} {kept:>11}")
    finally:
        server.kill()


if __name__ == "__main__":
    main()
