"""Memory of the app under oversize requests (issue #17): RSS before and after N attempts.

    python -m bench.hostile [--attempts 20] [--megabytes 10]

Serves the whole app (TGI backend on the protocol double, tests/tgi_double.py) in this process on
loopback, posts N chat requests of the given size to Gradio's REST route (each one a session of
its own, as any client may), and prints this process's RSS before and after, then checks that a
normal chat is still answered. Loopback only; the attempts are a bounded loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attempts", type=int, default=20)
    parser.add_argument("--megabytes", type=float, default=10.0)
    args = parser.parse_args()

    import httpx
    from gradio_client import Client

    from chat.config import Settings
    from tests.reliability import ARGS, app_on_double, process_figures

    size = int(args.megabytes * 1_000_000)
    has_limit = any(f.name == "max_request_bytes" for f in dataclasses.fields(Settings))
    with app_on_double(tokens_per_second=None) as (url, _):
        Client(url, verbose=False).predict("Hello", *ARGS, api_name="/chat")
        # One body, made before the first reading: the client's own memory stays the same.
        body = json.dumps({"data": ["x" * size, *ARGS, None]}).encode()
        gc.collect()
        before = process_figures()["rss_mib"]
        statuses: dict[int, int] = {}
        started = time.perf_counter()
        with httpx.Client(base_url=url, timeout=120) as http:
            for _ in range(args.attempts):
                posted = http.post(
                    "gradio_api/call/chat", content=body, headers={"content-type": "application/json"}
                )
                statuses[posted.status_code] = statuses.get(posted.status_code, 0) + 1
                if posted.status_code == 200:  # read the answer (a refusal) to the end
                    with http.stream("GET", f"gradio_api/call/chat/{posted.json()['event_id']}") as events:
                        for _ in events.iter_lines():
                            pass
        elapsed = time.perf_counter() - started
        gc.collect()
        after = process_figures()["rss_mib"]
        reply = Client(url, verbose=False).predict("Still there?", *ARGS, api_name="/chat")
    print("| body limit | attempts | size | HTTP statuses | RSS before | RSS after | time | chat after |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {'on' if has_limit else 'none'} | {args.attempts} | {args.megabytes:g} MB | "
        f"{', '.join(f'{k}: {v}' for k, v in sorted(statuses.items()))} | {before:.0f} MiB | "
        f"{after:.0f} MiB | {elapsed:.1f} s | {'answered' if reply.startswith('word0') else 'FAILED'} |"
    )


if __name__ == "__main__":
    main()
