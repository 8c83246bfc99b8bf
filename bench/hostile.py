"""Memory of the app under oversize requests, and dropped sessions (issue #17).

    python -m bench.hostile [--attempts 20] [--megabytes 10]
    python -m bench.hostile --drops 3 [--tokens-per-second 1] [--before-first-token]
    python -m bench.hostile --exports 100 [--megabytes 1]

The second form drops a chat session (the client closes its event stream) after three updates,
with the TGI double streaming at the given pace (or, with --before-first-token, while the double
holds the request without a token, under a 60 s first-token timeout), and prints the seconds from
the drop until the double sees its stream closed, for each of the sessions (one at a time). The third calls the
export event N times with a system prompt of the given size and prints the disk the app's files
take afterwards (its export folders and Gradio's copies of them, under GRADIO_TEMP_DIR and /tmp).

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
    parser.add_argument("--drops", type=int, default=0, help="sessions to drop, one at a time")
    parser.add_argument("--tokens-per-second", type=float, default=1.0)
    parser.add_argument("--before-first-token", action="store_true", help="--drops: a silent server")
    parser.add_argument("--exports", type=int, default=0, help="export calls to make")
    args = parser.parse_args()
    if args.drops:
        return drops(args.drops, args.tokens_per_second, args.before_first_token)
    if args.exports:
        return exports(args.exports, args.megabytes)

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


def _disk_mb(folders) -> float:
    total = 0
    for folder in folders:
        for root, _, names in os.walk(folder):
            total += sum(os.path.getsize(os.path.join(root, name)) for name in names)
    return total / 1e6


def exports(calls: int, megabytes: float) -> None:
    import glob
    import tempfile

    import httpx

    from tests.reliability import app_on_double

    # Everything the app writes goes under this process's own temporary folder.
    scratch = tempfile.mkdtemp(prefix="bench-hostile-")
    os.environ["TMPDIR"] = scratch
    tempfile.tempdir = None
    os.environ["GRADIO_TEMP_DIR"] = os.path.join(scratch, "gradio")
    history = [
        {"role": role, "content": [{"type": "text", "text": text}]}
        for role, text in [("user", "Hi"), ("assistant", "Hello")]
    ]
    started = time.perf_counter()
    with app_on_double(tokens_per_second=None) as (url, _):
        with httpx.Client(base_url=url, timeout=120) as http:
            for number in range(calls):
                prompt = f"{number} ".ljust(int(megabytes * 1_000_000), "x")
                posted = http.post("gradio_api/call/export", json={"data": [history, prompt]})
                assert posted.status_code == 200, posted.text[:300]
                with http.stream("GET", f"gradio_api/call/export/{posted.json()['event_id']}") as events:
                    for _ in events.iter_lines():
                        pass
        elapsed = time.perf_counter() - started
        during = _disk_mb(glob.glob(os.path.join(scratch, "*")))
    after = _disk_mb(glob.glob(os.path.join(scratch, "*")))
    print("| export calls | system prompt | disk while running | disk after exit | time |")
    print("|---|---|---|---|---|")
    print(f"| {calls} | {megabytes:g} MB | {during:.0f} MB | {after:.0f} MB | {elapsed:.1f} s |")


def drops(sessions: int, tokens_per_second: float, before_first_token: bool = False) -> None:
    import httpx

    from tests.reliability import ARGS, QUICK, app_on_double, settled
    from tests.tgi_double import Reply

    seconds = []
    options = dataclasses.replace(QUICK, first_token_timeout_s=60.0)
    with app_on_double(tokens_per_second=tokens_per_second, options=options) as (url, double):
        silent = Reply(fail="silent_before")
        double.reply_for = lambda body: silent if before_first_token else Reply(text="word " * 400)
        body = json.dumps({"data": ["Hello", ARGS[0], 0.7, 300, 0.9, 1.0, None]})
        for _ in range(sessions):
            before, asked = double.disconnects, len(double.generate_requests())
            with httpx.Client(base_url=url, timeout=60) as http:
                posted = http.post(
                    "gradio_api/call/chat", content=body, headers={"content-type": "application/json"}
                )
                with http.stream("GET", f"gradio_api/call/chat/{posted.json()['event_id']}") as events:
                    if before_first_token:  # dropped once the server holds the request
                        settled(lambda: len(double.generate_requests()) > asked, timeout_s=10)
                    updates = 0
                    for line in () if before_first_token else events.iter_lines():
                        updates += line.startswith("data:")
                        if updates >= 3:
                            break
            dropped = time.perf_counter()
            while double.disconnects == before and time.perf_counter() - dropped < 60:
                time.sleep(0.01)
            seconds.append(time.perf_counter() - dropped)
    pace = "before the first token" if before_first_token else f"{tokens_per_second:g} tokens/s"
    print("| server | sessions dropped | seconds from drop to closed server stream |")
    print("|---|---|---|")
    print(f"| {pace} | {sessions} | {', '.join(f'{s:.2f}' for s in seconds)} |")


if __name__ == "__main__":
    main()
