"""The app against hostile clients and servers (issues #17 and #24): each mode prints a table.

    python -m bench.hostile [--attempts 20] [--megabytes 10]         # oversize requests: memory
    python -m bench.hostile --drops 3 [--tokens-per-second 1] [--before-first-token]
    python -m bench.hostile --exports 100 [--megabytes 1]             # disk, and a victim's export
    python -m bench.hostile --json-flood 32 [--megabytes 2]           # bodies of {} under the limit
    python -m bench.hostile --hung-endpoint 6 [--connect 2 --first-token 10]
    python -m bench.hostile --round-robin 20
    python -m bench.hostile --endless 30                              # a server ignoring max_new_tokens
    python -m bench.hostile --long-line 200                           # one line of 200 MB
    python -m bench.hostile --bad-token                               # a token's text not text
    python -m bench.hostile --slow-connections 5000 [--hold 45 --open-files 1024] [--app DIR]
    python -m bench.hostile --flood 3000 [--rate 88] [--app DIR]      # requests from one address
    python -m bench.hostile --sigterm 64 [--app DIR]                  # exports left after SIGTERM
    python -m bench.hostile --session 6 [--app DIR]                   # logs and telemetry

The first form serves the whole app (TGI backend on the protocol double, tests/tgi_double.py) in
this process on loopback, posts N chat requests of the given size to Gradio's REST route (each one
a session of its own, as any client may), and prints this process's RSS before and after, then
checks that a normal chat is still answered. `--drops` drops a chat session (the client closes its
event stream) after three updates, with the TGI double streaming at the given pace (or, with
--before-first-token, while the double holds the request without a token, under a 60 s
first-token timeout), and prints the seconds from the drop until the double sees its stream
closed, for each of the sessions (one at a time). `--exports` exports a victim's conversation,
then calls the export event N times with a system prompt of the given size, and prints the disk
the app's files take afterwards and whether the victim's files were still there.

The modes of issue #24 live in bench/hostile_servers.py (hung and hostile model servers, in this
process) and bench/hostile_clients.py (floods, stalls, signals, logs; the last four run
`python app.py` from `--app DIR`, this checkout by default). For a "before" column, copy this
bench and the tests' doubles into an older checkout and run it there (docs/reliability.md says
how). Loopback only; every attack is a bounded loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

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
    parser.add_argument("--json-flood", type=int, default=0, help="requests of {} objects")
    parser.add_argument("--hung-endpoint", type=int, default=0, help="messages, one endpoint hung")
    parser.add_argument("--connect", type=float, default=2.0, help="--hung-endpoint: connect timeout")
    parser.add_argument(
        "--first-token", type=float, default=10.0, help="--hung-endpoint: first-token timeout"
    )
    parser.add_argument("--round-robin", type=int, default=0, help="messages over two endpoints")
    parser.add_argument("--endless", type=float, default=0, help="seconds to read an endless reply")
    parser.add_argument("--long-line", type=int, default=0, help="megabytes of one line")
    parser.add_argument("--bad-token", action="store_true", help="tokens whose text is not text")
    parser.add_argument("--slow-connections", type=int, default=0, help="half-sent requests to hold")
    parser.add_argument("--hold", type=float, default=45.0, help="--slow-connections: seconds")
    parser.add_argument("--open-files", type=int, default=1024, help="--slow-connections: the app's limit")
    parser.add_argument("--flood", type=int, default=0, help="requests from one address")
    parser.add_argument("--rate", type=float, default=88.0, help="--flood: requests per second")
    parser.add_argument("--sigterm", type=float, default=0, help="megabytes of exports, then SIGTERM")
    parser.add_argument("--session", type=int, default=0, help="messages in a logged session")
    parser.add_argument(
        "--app", type=Path, default=Path(__file__).resolve().parent.parent, help="checkout to run"
    )
    args = parser.parse_args()
    if args.drops:
        return drops(args.drops, args.tokens_per_second, args.before_first_token)
    if args.exports:
        return exports(args.exports, args.megabytes)
    from bench import hostile_clients, hostile_servers

    modes = [
        (args.json_flood, lambda: hostile_clients.json_flood(args.json_flood, min(args.megabytes, 2.0))),
        (
            args.hung_endpoint,
            lambda: hostile_servers.hung_endpoint(args.hung_endpoint, args.connect, args.first_token),
        ),
        (args.round_robin, lambda: hostile_servers.round_robin(args.round_robin)),
        (args.endless, lambda: hostile_servers.endless(args.endless, 200)),
        (args.long_line, lambda: hostile_servers.long_line(args.long_line)),
        (args.bad_token, hostile_servers.bad_token),
        (
            args.slow_connections,
            lambda: hostile_clients.slow_connections(
                args.app, args.slow_connections, args.hold, args.open_files
            ),
        ),
        (args.flood, lambda: hostile_clients.flood(args.app, args.flood, args.rate)),
        (args.sigterm, lambda: hostile_clients.sigterm(args.app, args.sigterm)),
        (args.session, lambda: hostile_clients.session(args.app, args.session)),
    ]
    for chosen, run in modes:
        if chosen:
            return run()

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

    def export(http, prompt: str) -> tuple[str, list[str]]:
        about = {
            "title": "Export",
            "time": "2026-12-08 14:32",
        }  # the chat's name and time, as the page sends them
        posted = http.post("gradio_api/call/export", json={"data": [history, prompt, about]})
        assert posted.status_code == 200, posted.text[:300]
        event, paths = None, []
        with http.stream("GET", f"gradio_api/call/export/{posted.json()['event_id']}") as events:
            for line in events.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event == "complete":
                    output = json.loads(line[5:])[0]
                    paths = [f["path"] for f in (output["value"] if isinstance(output, dict) else output)]
        return event, paths

    started = time.perf_counter()
    events: dict[str, int] = {}
    victim_gone_after = None
    with app_on_double(tokens_per_second=None) as (url, _):
        with httpx.Client(base_url=url, timeout=120) as http:
            _, victim = export(http, "the victim's conversation")
            for number in range(calls):
                event, _ = export(http, f"{number} ".ljust(int(megabytes * 1_000_000), "x"))
                events[event] = events.get(event, 0) + 1
                if victim_gone_after is None and not all(os.path.exists(path) for path in victim):
                    victim_gone_after = (number + 1, time.perf_counter() - started)
        elapsed = time.perf_counter() - started
        during = _disk_mb(glob.glob(os.path.join(scratch, "*")))
    after = _disk_mb(glob.glob(os.path.join(scratch, "*")))
    shutil.rmtree(scratch, ignore_errors=True)
    gone = (
        f"after {victim_gone_after[0]} exports ({victim_gone_after[1]:.1f} s)"
        if victim_gone_after
        else "kept"
    )
    print(
        "| export calls | system prompt | outcomes | victim's export | disk while running | disk after exit | time |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {calls} | {megabytes:g} MB | {', '.join(f'{k}: {v}' for k, v in sorted(events.items()))} | {gone} "
        f"| {during:.0f} MB | {after:.0f} MB | {elapsed:.1f} s |"
    )


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
