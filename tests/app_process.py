"""`python app.py` in a process of its own, as an operator runs it, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.helpers import free_port

REPO = Path(__file__).resolve().parent.parent
STARTUP_S = 90


@contextlib.contextmanager
def app_process(
    args,
    *,
    log_path: Path,
    env: dict | None = None,
    repo: Path = REPO,
    open_files: int | None = None,
    startup_s: float = STARTUP_S,
):
    """Run `python app.py ARGS --port P` from `repo` with `env` (this process's by default), its
    output in `log_path`, at most `open_files` file descriptors if given; yields (url, process)
    once it is up (within `startup_s`), and kills it afterwards if it still runs."""
    port = free_port()

    def limit_files():
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "app.py", *args, "--port", str(port)],
            cwd=repo,
            env=env if env is not None else os.environ.copy(),
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=limit_files,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + startup_s
        # /healthz answers before launch() returns (Gradio then checks that it can reach itself):
        # ready is when the app has said where it runs.
        while not (
            _answers(url + "healthz") and "running on" in log_path.read_text(errors="replace").lower()
        ):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"app.py did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _answers(url: str) -> bool:
    """Whether the app serves: any HTTP answer counts, 503 too (a backend whose server is down)."""
    try:
        httpx.get(url, timeout=2)
        return True
    except httpx.HTTPError:
        return False
