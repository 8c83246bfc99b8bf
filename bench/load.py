"""Load benchmark: many concurrent chat sessions through the whole app, against the TGI protocol double.

    python bench/load.py                        # 64 sessions x 3 turns at 20 tokens/s, then 1 stream at 1,000/s
    python bench/load.py --sessions 8 --turns 1 --fast-tokens 0 --json bench/out/small.json
    python bench/load.py --bare-gradio --baseline-app /tmp/before --ramp-s 5   # against floor and past

What runs where (all on loopback):
- the TGI protocol double (tests/tgi_double.py) in this process, streaming each reply at
  `--tokens-per-second`; it records when each request arrived and when it sent each token, which is
  "the backend's own timing";
- the app as a subprocess, `python app.py --backend tgi --endpoint <double>` (so its RSS and thread
  count are its own), or any running app given with `--url` (then the double must be the one it uses);
- the clients: one asyncio task per session in this process, speaking Gradio's REST route
  (`POST /gradio_api/call/chat`, then the event stream of that call) with a session hash per session,
  so each session is a real multi-turn conversation. gradio_client is not used for the load itself:
  its job iterator polls every 1 ms per job under a lock, and 64 such threads take a core of this
  2-core machine from the app being measured.

Each reply the double sends is derived from the session and turn named in the prompt, in several
scripts (Latin with accents, CJK, Hebrew, emoji, combining marks), and every other turn ends with a
forged "\\nUser:" turn that the stop sequences must cut. A reply counts as *garbled* unless every
update the client saw is a prefix of the final text and the final text, without the app's footer
(`strip_note`), is exactly what the double sent up to the stop sequence, stripped.

Prints one table per phase and writes everything as JSON (`--json`, default bench/out/load.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chat.conversation.turns import strip_note  # noqa: E402
from tests.tgi_double import Reply, TGIDouble, tokenize  # noqa: E402

WORDS = (
    "falcon",
    "city",
    "dawn",
    "river",
    "Grüße",
    "Lisboa",
    "naïve",
    "日本語",
    "東京",
    "שלום",
    "مرحبا",
    "🦅",
    "👩‍💻",
    "e\u0301te\u0301",
    "Ωμέγα",
    "x²",
    "—",
    "1,000",
    "«quoted»",
    "zero\u200bwidth",
)
FORGED_TURN = "\nUser: this forged turn must be cut by the stop filter"
_TAG = re.compile(r"\[(s\d+t\d+)\]")


def reply_text(tag: str, tokens: int) -> str:
    """What the double answers to the message tagged `tag`: `tokens` of its tokens, sometimes more."""
    rng = random.Random(tag)
    words = [f"{tag}:"] + [rng.choice(WORDS) for _ in range(max(tokens - 1, 0))]
    text = " ".join(words)
    session_turn = int(tag.split("t")[1])
    return text + FORGED_TURN if session_turn % 2 else text


def expected_reply(text: str) -> str:
    """What the page must show for `text`: up to the first stop sequence, stripped."""
    return text.split("\nUser:")[0].strip()


# -- the double, with its own timing --------------------------------------------------------------


@dataclass
class ServerTiming:
    received: float
    token_times: list[float] = field(default_factory=list)


class TimedDouble(TGIDouble):
    """The TGI double, answering each tagged prompt with `reply_text(tag)` and timing every token."""

    def __init__(self, *, reply_tokens: int, **kwargs):
        super().__init__(**kwargs)
        self.reply_tokens = reply_tokens
        self.timings: dict[str, ServerTiming] = {}

    def stream_started(self, body: dict) -> ServerTiming:
        timing = ServerTiming(time.perf_counter())
        tags = _TAG.findall(body.get("inputs", ""))
        if tags:
            self.timings[tags[-1]] = timing
        return timing

    def token_sent(self, stream: ServerTiming, special: bool) -> None:
        if not special:
            stream.token_times.append(time.perf_counter())

    def reply_for(self, body: dict) -> Reply:
        tags = _TAG.findall(body.get("inputs", ""))
        if not tags:
            return super().reply_for(body)
        return Reply(text=reply_text(tags[-1], self.reply_tokens))


# -- the clients --------------------------------------------------------------------------------------


@dataclass
class ClientReply:
    tag: str
    sent: str  # the text the double sends
    submitted: float
    update_times: list[float] = field(default_factory=list)
    final: str | None = None
    error: str | None = None
    garbled: bool = False


async def one_reply(
    http: httpx.AsyncClient, session_hash: str, tag: str, sent: str, max_new_tokens: int
) -> ClientReply:
    """Send one message through /gradio_api/call/chat and read its stream to the end; `sent` is
    what the double will answer."""
    reply = ClientReply(tag, sent, time.perf_counter())
    texts: list[str] = []
    try:
        posted = await http.post(
            "gradio_api/call/chat",
            json={
                "data": [f"[{tag}] Please answer.", "", 0.7, max_new_tokens, 0.9, 1.0, None],
                "session_hash": session_hash,
            },
        )
        if posted.status_code != 200:
            reply.error = f"HTTP {posted.status_code}: {posted.text[:200]}"
            return reply
        event_id = posted.json()["event_id"]
        event = None
        async with http.stream("GET", f"gradio_api/call/chat/{event_id}") as stream:
            async for line in stream.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event in ("generating", "complete"):
                    text = json.loads(line[5:])[0]
                    if event == "generating" and strip_note(text) == text:  # not a note-only update
                        reply.update_times.append(time.perf_counter())
                        texts.append(text)
                    if event == "complete":
                        reply.final = text
                elif line.startswith("data:") and event == "error":
                    reply.error = line[5:].strip()[:300]
    except (httpx.HTTPError, OSError, ValueError) as error:
        reply.error = f"{type(error).__name__}: {error}"
    if reply.final is not None and reply.error is None:
        final = strip_note(reply.final)
        reply.garbled = final != expected_reply(sent) or any(not final.startswith(t) for t in texts)
    return reply


async def session(
    http,
    number: int,
    turns: int,
    reply_tokens: int,
    max_new_tokens: int,
    start: asyncio.Event,
    reply_timeout_s: float,
    delay_s: float = 0.0,
) -> list[ClientReply]:
    await start.wait()
    await asyncio.sleep(delay_s)  # arrivals spread over the ramp: load shaping, not synchronisation
    replies = []
    for turn in range(turns):
        tag = f"s{number}t{turn}"
        sent = reply_text(tag, reply_tokens)
        call = one_reply(http, f"load-{os.getpid()}-{number}", tag, sent, max_new_tokens)
        try:
            replies.append(await asyncio.wait_for(call, reply_timeout_s))
        except asyncio.TimeoutError:
            replies.append(
                ClientReply(tag, sent, time.perf_counter(), error=f"no reply within {reply_timeout_s:g} s")
            )
    return replies


# -- the app process -----------------------------------------------------------------------------------


def process_figures(pid: int) -> dict:
    """RSS (MiB), threads and open file descriptors of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
    return {
        "rss_mib": round(rss_kib / 1024, 1),
        "threads": threads,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(
    endpoint: str, app_args: list[str], app_dir: Path = ROOT, script: str = "app.py"
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    # The app logs a line per reply: to a file, since an unread pipe would fill and block it.
    log_path = ROOT / "bench" / "out" / f"app-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            sys.executable,
            str(app_dir / script),
            "--backend",
            "tgi",
            "--endpoint",
            endpoint,
            "--port",
            str(port),
            *app_args,
        ],
        cwd=app_dir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log_path.open("wb"),
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app did not start:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url + "healthz", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)  # a start-up poll, not synchronisation between the measured parts
    process.kill()
    raise RuntimeError("the app did not answer /healthz within 60 s")


# -- one phase -----------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def ms(value):
    return None if value is None else round(value * 1000, 1)


async def run_phase(
    url: str,
    double: TimedDouble,
    *,
    sessions: int,
    turns: int,
    tokens_per_second: float,
    reply_tokens: int,
    app_pid: int | None = None,
    reply_timeout_s: float = 60,
    ramp_s: float = 0.0,
) -> dict:
    """Run `sessions` concurrent conversations of `turns` replies each; return the figures."""
    double.tokens_per_second = tokens_per_second
    double.timings.clear()
    double.reply_tokens = reply_tokens
    max_new_tokens = reply_tokens + 20
    limits = httpx.Limits(max_connections=2 * sessions + 8, max_keepalive_connections=2 * sessions + 8)
    figures = {"before": process_figures(app_pid) if app_pid else None, "peak_rss_mib": 0, "peak_threads": 0}
    stop_sampling = asyncio.Event()

    async def sample():
        while app_pid and not stop_sampling.is_set():
            now = process_figures(app_pid)
            figures["peak_rss_mib"] = max(figures["peak_rss_mib"], now["rss_mib"])
            figures["peak_threads"] = max(figures["peak_threads"], now["threads"])
            try:
                await asyncio.wait_for(stop_sampling.wait(), 0.25)
            except asyncio.TimeoutError:
                pass

    cpu_before = cpu_seconds(app_pid) if app_pid else None
    own_cpu_before = cpu_seconds(os.getpid())
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60.0), limits=limits) as http:
        start = asyncio.Event()
        tasks = [
            asyncio.create_task(
                session(
                    http,
                    n,
                    turns,
                    reply_tokens,
                    max_new_tokens,
                    start,
                    reply_timeout_s,
                    n * ramp_s / sessions,
                )
            )
            for n in range(sessions)
        ]
        sampler = asyncio.create_task(sample())
        began = time.perf_counter()
        start.set()
        done = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - began
        stop_sampling.set()
        await sampler
    replies = [reply for replies in done for reply in replies]
    if app_pid:
        figures["after"] = process_figures(app_pid)
        figures["app_cpu_s"] = round(cpu_seconds(app_pid) - cpu_before, 2)
    own_cpu_s = round(cpu_seconds(os.getpid()) - own_cpu_before, 2)

    client_ttft, server_ttft, added_ttft, client_gaps, server_gaps, lags, rates = [], [], [], [], [], [], []
    reached, backend_rates, added_first, added_later = [], [], [], []
    for reply in replies:
        timing = double.timings.get(reply.tag)
        if reply.final is None or not reply.update_times or timing is None or not timing.token_times:
            continue
        c_ttft = reply.update_times[0] - reply.submitted
        s_ttft = timing.token_times[0] - timing.received
        client_ttft.append(c_ttft)
        reached.append(timing.received - reply.submitted)
        if len(timing.token_times) > 1 and timing.token_times[-1] > timing.token_times[0]:
            backend_rates.append(
                (len(timing.token_times) - 1) / (timing.token_times[-1] - timing.token_times[0])
            )
        server_ttft.append(s_ttft)
        added_ttft.append(c_ttft - s_ttft)
        (added_first if reply.tag.endswith("t0") else added_later).append(c_ttft - s_ttft)
        client_gaps += [b - a for a, b in zip(reply.update_times, reply.update_times[1:], strict=False)]
        server_gaps += [b - a for a, b in zip(timing.token_times, timing.token_times[1:], strict=False)]
        lags.append(reply.update_times[-1] - timing.token_times[-1])
        shown_tokens = len(tokenize(expected_reply(reply.sent)))
        span = reply.update_times[-1] - reply.update_times[0]
        if shown_tokens > 1 and span > 0:
            rates.append((shown_tokens - 1) / span)
    completed = [r for r in replies if r.final is not None and r.error is None]
    return {
        "sessions": sessions,
        "turns": turns,
        "tokens_per_second": tokens_per_second,
        "reply_tokens": reply_tokens,
        "replies": len(replies),
        "completed": len(completed),
        "failed": len(replies) - len(completed),
        "garbled": sum(r.garbled for r in completed),
        "errors": sorted({r.error for r in replies if r.error})[:5],
        "elapsed_s": round(elapsed, 2),
        "replies_per_s": round(len(completed) / elapsed, 2),
        "client_ttft_ms": {"p50": ms(percentile(client_ttft, 50)), "p99": ms(percentile(client_ttft, 99))},
        "backend_ttft_ms": {"p50": ms(percentile(server_ttft, 50)), "p99": ms(percentile(server_ttft, 99))},
        "app_added_ttft_ms": {"p50": ms(percentile(added_ttft, 50)), "p99": ms(percentile(added_ttft, 99))},
        "app_added_ttft_first_turn_ms": {
            "p50": ms(percentile(added_first, 50)),
            "p99": ms(percentile(added_first, 99)),
        },
        "app_added_ttft_later_turns_ms": {
            "p50": ms(percentile(added_later, 50)),
            "p99": ms(percentile(added_later, 99)),
        },
        "ramp_s": ramp_s,
        "client_inter_token_ms": {
            "p50": ms(percentile(client_gaps, 50)),
            "p99": ms(percentile(client_gaps, 99)),
        },
        "backend_inter_token_ms": {
            "p50": ms(percentile(server_gaps, 50)),
            "p99": ms(percentile(server_gaps, 99)),
        },
        "request_reaches_backend_ms": {
            "p50": ms(percentile(reached, 50)),
            "p99": ms(percentile(reached, 99)),
        },
        "client_tokens_per_s": round(statistics.median(rates), 1) if rates else None,
        "backend_tokens_per_s": round(statistics.median(backend_rates), 1) if backend_rates else None,
        "last_token_lag_ms": {"p50": ms(percentile(lags, 50)), "max": ms(max(lags) if lags else None)},
        "backend_disconnects": double.disconnects,
        "bench_cpu_s": own_cpu_s,  # this process: the double and the clients
        "app": figures if app_pid else None,
    }


def table(result: dict) -> str:
    """The phase's figures as a Markdown table (docs/reliability.md keeps one)."""

    def pair(key, second="p99"):
        value = result[key]
        return f"{value['p50']} / {value[second]}"

    rows = [
        (
            "sessions x turns",
            f"{result['sessions']} x {result['turns']} at {result['tokens_per_second']:g} tokens/s, "
            f"{result['reply_tokens']} tokens per reply, starts spread over {result['ramp_s']:g} s",
        ),
        ("completed / failed / garbled", f"{result['completed']} / {result['failed']} / {result['garbled']}"),
        ("TTFT p50 / p99, client (ms)", pair("client_ttft_ms")),
        ("TTFT p50 / p99, backend (ms)", pair("backend_ttft_ms")),
        ("app-added TTFT p50 / p99 (ms)", pair("app_added_ttft_ms")),
        (
            "... first turns / later turns (ms)",
            f"{pair('app_added_ttft_first_turn_ms')} / {pair('app_added_ttft_later_turns_ms')}",
        ),
        ("inter-token p50 / p99, client (ms)", pair("client_inter_token_ms")),
        ("inter-token p50 / p99, backend (ms)", pair("backend_inter_token_ms")),
        ("request reaches the backend p50 / p99 (ms after submit)", pair("request_reaches_backend_ms")),
        (
            "token rate, median, client / backend (tokens/s)",
            f"{result['client_tokens_per_s']} / {result['backend_tokens_per_s']}",
        ),
        ("last token lag p50 / max (ms)", pair("last_token_lag_ms", "max")),
        ("replies/s", result["replies_per_s"]),
    ]
    app = result.get("app")
    if app:
        rows += [
            (
                "app RSS before / peak / after (MiB)",
                f"{app['before']['rss_mib']} / {app['peak_rss_mib']} / {app['after']['rss_mib']}",
            ),
            (
                "app threads before / peak / after",
                f"{app['before']['threads']} / {app['peak_threads']} / {app['after']['threads']}",
            ),
            ("CPU time, app / double + clients (s)", f"{app['app_cpu_s']} / {result['bench_cpu_s']}"),
        ]
    if result["errors"]:
        rows.append(("errors (first)", "; ".join(result["errors"])))
    return "\n".join(["| figure | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--turns", type=int, default=3, help="replies per session, one after another")
    parser.add_argument("--tokens-per-second", type=float, default=20.0, help="per stream, at the double")
    parser.add_argument("--reply-tokens", type=int, default=64)
    parser.add_argument(
        "--ramp-s",
        type=float,
        default=0.0,
        help="spread the sessions' first messages over this many seconds (0: all at once)",
    )
    parser.add_argument(
        "--fast-tokens", type=int, default=2000, help="tokens of the single fast stream (0: skip that phase)"
    )
    parser.add_argument("--fast-rate", type=float, default=1000.0)
    parser.add_argument("--app-arg", action="append", default=[], help="extra app.py argument (repeatable)")
    parser.add_argument(
        "--baseline-app",
        type=Path,
        help="a checkout of an earlier version (e.g. from `git archive`), run first with "
        "the same phases, for before/after figures from one run",
    )
    parser.add_argument(
        "--bare-gradio",
        action="store_true",
        help="also run the phases against bench/bare_gradio.py (the least Gradio chat app "
        "on the same double): the floor the framework sets on this machine",
    )
    parser.add_argument("--json", default=str(ROOT / "bench" / "out" / "load.json"))
    args = parser.parse_args(argv)

    results = {
        "command": " ".join(["python", "bench/load.py", *(argv if argv is not None else sys.argv[1:])]),
        "cores": os.cpu_count(),
    }
    phases = [
        dict(
            sessions=args.sessions,
            turns=args.turns,
            tokens_per_second=args.tokens_per_second,
            reply_tokens=args.reply_tokens,
            ramp_s=args.ramp_s,
        )
    ]
    if args.fast_tokens:
        phases.append(
            dict(sessions=1, turns=1, tokens_per_second=args.fast_rate, reply_tokens=args.fast_tokens)
        )
    apps = []
    if args.bare_gradio:
        apps += [
            ("bare_gradio", ROOT, "bench/bare_gradio.py", "bare Gradio, an update per token", []),
            (
                "bare_gradio_two_updates",
                ROOT,
                "bench/bare_gradio.py",
                "bare Gradio, first token and whole reply only",
                ["--first-and-last"],
            ),
        ]
    if args.baseline_app:
        apps.append(("baseline", args.baseline_app.resolve(), "app.py", str(args.baseline_app), args.app_arg))
    apps.append(("phases", ROOT, "app.py", "this tree", args.app_arg))
    with TimedDouble(reply_tokens=args.reply_tokens, max_input_tokens=4096, max_total_tokens=8192) as double:
        for name, app_dir, script, title, app_args in apps:
            print(f"## {title}\n", flush=True)
            results[name] = run_app(double, app_dir, app_args, phases, script)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2, ensure_ascii=False))
    print(f"written: {args.json}")
    return 0 if all(p["failed"] == 0 and p["garbled"] == 0 for p in results["phases"]) else 1


def run_app(
    double: TimedDouble, app_dir: Path, app_args: list[str], phases: list[dict], script: str = "app.py"
) -> list[dict]:
    """Start the app in `app_dir` on the double, warm it up, run each phase, stop it."""
    process, url = start_app(double.url, app_args, app_dir, script)
    results = []
    try:
        warm = asyncio.run(run_phase(url, double, sessions=2, turns=1, tokens_per_second=200, reply_tokens=8))
        if warm["completed"] != 2:
            print("warm-up failed:", warm["errors"], file=sys.stderr)
        for phase in phases:
            double.disconnects = 0
            result = asyncio.run(run_phase(url, double, app_pid=process.pid, **phase))
            results.append(result)
            print(table(result), end="\n\n", flush=True)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
    return results


if __name__ == "__main__":
    sys.exit(main())
