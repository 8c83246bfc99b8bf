"""A real `transformers serve` process on a free loopback port, serving a local model on CPU.

What it is, as measured with transformers 5.23: an OpenAI-compatible server that generates one
request at a time on a persistent thread (without --continuous-batching), honours `max_tokens`
and `stop`, and cancels generation when the client disconnects. Its model name is the path it
was started with, exactly (requests for any other name get HTTP 400 "Server is pinned to ...").
GET /v1/models lists only the Hub cache (HTTP 500 when no cache folder exists), never the pinned
local model, and it has no /tokenize: clients must be given the model name and must estimate.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

STARTUP_TIMEOUT_S = 90


@dataclass(frozen=True)
class ServeProcess:
    url: str  # the OpenAI base URL, ending in /v1
    model: str  # the name requests must use
    log_path: Path


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def running(
    command: list[str], ready_url: str, *, name: str, env: dict | None = None, cwd: Path | None = None
):
    """Run `command`, its output in a log file, until `ready_url` answers 200; yield the log's
    path; stop the process when done (terminate, then kill after 10 s)."""
    log_path = Path(tempfile.mkdtemp(prefix=f"{name}-")) / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _ready(ready_url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=0.1)  # a readiness poll that also notices a crash
        yield log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def transformers_serve(model_dir: Path, port: int):
    """Start `transformers serve model_dir` offline on CPU; yield a ServeProcess; stop it."""
    executable = shutil.which("transformers", path=str(Path(sys.executable).parent)) or "transformers"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    command = [executable, "serve", str(model_dir), "--port", str(port), "--host", "127.0.0.1"]
    command += ["--device", "cpu", "--log-level", "warning"]
    with running(command, f"http://127.0.0.1:{port}/health", name="transformers-serve", env=env) as log_path:
        yield ServeProcess(f"http://127.0.0.1:{port}/v1", str(model_dir), log_path)
