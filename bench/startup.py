"""Start-up benchmark: how long `python app.py` (the README's run command) takes to serve, first and
later times, and what its first answer is.

    python bench/startup.py                                # the default app, twice, fresh cache
    python bench/startup.py --baseline-app /tmp/before     # the same for another checkout, in this run
    python bench/startup.py --args "--model /path/to/folder" --runs 3

Each run starts `python app.py` (tests/app_process.py) with `XDG_CACHE_HOME` pointing at a folder
made for this benchmark (so the first run builds whatever the default model needs and later runs
reuse it) and the hub offline, and measures:
- *serving*: seconds from the process start until its /healthz answers;
- *CPU*: the CPU seconds the app's process used until then (user + system, all its threads): on a
  shared machine, wall time grows with the other work, CPU time much less;
- *first answer*: seconds for "What is the capital of France?" through `/chat` (greedy, 64 new
  tokens at most), and the answer's first words.
Prints a table with the machine's load average and writes JSON (`--json`, default
bench/out/startup.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.app_process import app_process  # noqa: E402

QUESTION = "What is the capital of France?"
FIRST_START_S = 900  # the first start converts the default model: minutes on a busy machine


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_start(app_dir: Path, args: list[str], cache: Path) -> dict:
    """Start the app once, time it, ask one question, stop it."""
    from gradio_client import Client

    environ = {**os.environ, "XDG_CACHE_HOME": str(cache), "HF_HUB_OFFLINE": "1"}
    environ.pop("FALCON_CHAT_CACHE", None)
    started = time.perf_counter()
    log_path = cache / "app.log"
    with app_process(args, log_path=log_path, env=environ, repo=app_dir, startup_s=FIRST_START_S) as (
        url,
        process,
    ):
        serving_s = time.perf_counter() - started
        cpu_s = cpu_seconds(process.pid)
        asked = time.perf_counter()
        answer = Client(url, verbose=False).predict(QUESTION, "", 0.0, 64, 0.9, 1.0, "", api_name="/chat")
        return {
            "serving_s": round(serving_s, 2),
            "cpu_s": round(cpu_s, 2),
            "first_answer_s": round(time.perf_counter() - asked, 2),
            "answer": " ".join(str(answer).split())[:80],
            "load_average": os.getloadavg()[0],
        }


def measure(label: str, app_dir: Path, args: list[str], runs: int) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="falcon-chat-startup.") as cache:
        return [
            {"app": label, "run": run, **one_start(app_dir, args, Path(cache))} for run in range(1, runs + 1)
        ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=2, help="starts per app, the first on an empty cache")
    parser.add_argument("--args", default="", help='extra app.py arguments, e.g. "--model FOLDER"')
    parser.add_argument("--baseline-app", type=Path, help="another checkout to measure in the same run")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "startup.json")
    options = parser.parse_args()
    args = shlex.split(options.args)
    results = measure("this checkout", ROOT, args, options.runs)
    if options.baseline_app:
        results += measure(str(options.baseline_app), options.baseline_app, args, options.runs)
    print(f"{'app':<28} {'run':>3} {'serving s':>10} {'CPU s':>7} {'1st answer s':>13} {'load':>5}  answer")
    for row in results:
        print(
            f"{row['app'][-28:]:<28} {row['run']:>3} {row['serving_s']:>10.2f} {row['cpu_s']:>7.2f} "
            f"{row['first_answer_s']:>13.2f} {row['load_average']:>5.1f}  {row['answer'][:40]}"
        )
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"written: {options.json}")


if __name__ == "__main__":
    main()
