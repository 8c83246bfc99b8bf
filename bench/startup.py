"""Start-up benchmark: how long `python app.py` (the README's run command) takes to serve, first and
second time, and what its first answer is.

    python bench/startup.py                                # the default app, twice, fresh cache
    python bench/startup.py --baseline-app /tmp/before     # the same for another checkout, in this run
    python bench/startup.py --args "--model /path/to/folder" --runs 3

Each run starts `python app.py --port P` as a subprocess with `XDG_CACHE_HOME` pointing at a folder
made for this benchmark (so the first run builds whatever the default model needs and later runs
reuse it) and the hub offline, and measures:
- *serving*: seconds from the process start until it prints "Falcon Chat is running on";
- *first answer*: seconds for "What is the capital of France?" through `/chat` (greedy, the page's
  other defaults), and the answer's first words.
Prints a table and writes JSON (`--json`, default bench/out/startup.json).
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

from tests.helpers import app_process, free_port  # noqa: E402

QUESTION = "What is the capital of France?"


def one_start(app_dir: Path, args: list[str], cache: Path) -> dict:
    """Start the app once, time it, ask one question, stop it."""
    environ = {**os.environ, "XDG_CACHE_HOME": str(cache), "HF_HUB_OFFLINE": "1"}
    environ.pop("FALCON_CHAT_CACHE", None)
    started = time.perf_counter()
    with app_process("--port", str(free_port()), *args, env=environ, app_dir=app_dir) as (url, lines):
        serving_s = time.perf_counter() - started
        if url is None:
            return {"serving_s": None, "log": lines[-20:]}
        from gradio_client import Client

        asked = time.perf_counter()
        answer = Client(url, verbose=False).predict(QUESTION, "", 0.0, 64, 0.9, 1.0, "", api_name="/chat")
        return {
            "serving_s": round(serving_s, 2),
            "first_answer_s": round(time.perf_counter() - asked, 2),
            "answer": " ".join(str(answer).split())[:80],
            "log": [line for line in lines if " INFO " in line or "WARNING" in line][-6:],
        }


def measure(label: str, app_dir: Path, args: list[str], runs: int) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="falcon-chat-startup.") as cache:
        results = []
        for run in range(1, runs + 1):
            result = one_start(app_dir, args, Path(cache))
            results.append({"app": label, "run": run, **result})
        return results


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
    print(f"{'app':<28} {'run':>3} {'serving s':>10} {'1st answer s':>13}  answer")
    for row in results:
        serving = "failed" if row["serving_s"] is None else f"{row['serving_s']:.2f}"
        answer_s = f"{row.get('first_answer_s', 0):.2f}" if "first_answer_s" in row else "-"
        print(
            f"{row['app'][-28:]:<28} {row['run']:>3} {serving:>10} {answer_s:>13}  {row.get('answer', '')[:40]}"
        )
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"written: {options.json}")


if __name__ == "__main__":
    main()
