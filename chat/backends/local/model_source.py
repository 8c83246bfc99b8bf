"""Where the local model comes from, checked before anything loads: the default, a folder or a hub id.

- No `--model`: SmolLM2-135M-Instruct (default_model.py), a real model small enough for any CPU;
  where its package is not installed, the same model from the hub (a Space installs only
  requirements.txt) or its cache; failing both, the tiny random Falcon (tiny_model.py), and the
  page and the log say how to get the real one.
- A folder must exist and hold a `config.json`: "no such folder" in one sentence, not the hub
  library's "Repo id must be in the form ...".
- A hub id is looked up in the hub's cache and, unless the hub is switched off (HF_HUB_OFFLINE),
  asked of the hub once with a short timeout. An unreachable hub is then one sentence within
  seconds, instead of the download library's retries (45 warnings over ~50 s, then an error); a
  model already in the cache loads from there, offline.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from chat.conversation.errors import ConfigError

log = logging.getLogger(__name__)

HUB_TIMEOUT_S = 10.0  # one question to the hub: is this model there?
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
FALCON_HINT = (
    "For Falcon: `python app.py --model tiiuae/falcon-7b-instruct` (a GPU with 16 GB), or a server: "
    "`python app.py --backend tgi --endpoint http://host:8080`."
)


@dataclass(frozen=True)
class ModelSource:
    """A checked model to load, and how to present it."""

    path: str  # a folder, or a hub id (transformers downloads it or reads the hub cache)
    name: str  # as the page, /healthz, the export and the logs show it: never a whole local path
    notice: str = ""  # a sentence for the page and the log about this model, or ""
    dtype: str | None = None  # "float32" where the usual bf16 on a GPU would spoil the model


def local_model_source(model: str | None, *, token: str | None = None) -> ModelSource:
    """The model `--model` names (None: the default), checked as the module docstring says;
    ConfigError with one sentence naming the fix when it cannot be loaded."""
    if model is None:
        return default_source()
    folder = Path(model).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"--model {model}: this folder holds no config.json; a model folder holds config.json, "
                "the tokenizer and the weights, as save_pretrained writes them"
            )
        return ModelSource(str(folder), folder.resolve().name)
    if _looks_like_a_path(model):
        raise ConfigError(
            f"--model {model}: no such folder; give a model folder or a hub id such as tiiuae/falcon-7b-instruct"
        )
    if not _HUB_ID.fullmatch(model):
        raise ConfigError(
            f"--model {model!r} is neither a model folder nor a hub id such as tiiuae/falcon-7b-instruct"
        )
    return _hub_source(model, token)


def tiny_model_notice() -> str:
    """What the page says of the tiny random Falcon (served where SmolLM2's package is missing)."""
    from chat.backends.local import default_model

    return (
        "⚠️ This is a tiny demo model with random weights: its replies are gibberish. For a real small "
        f"model that runs offline on a CPU, `{default_model.INSTALL}` and restart. " + FALCON_HINT
    )


def default_source() -> ModelSource:
    """SmolLM2-135M-Instruct, or the tiny Falcon where its package is missing."""
    from chat.backends.local import default_model

    notice = (
        f"{default_model.MODEL_NAME} is the default: a small model (135M parameters) that runs "
        "offline on any CPU, so its answers are short and often wrong. " + FALCON_HINT
    )
    try:
        folder = default_model.ensure_smollm2()
    except default_model.DefaultModelMissing as missing:
        try:  # the same model from the hub (or its cache), as on a Space
            _hub_source(default_model.HUB_ID, None)
        except ConfigError as unreachable:
            from chat.backends.local.tiny_model import TINY_MODEL_NAME, ensure_tiny_model

            log.warning(
                "the default model %s is not available: %s; nor from the hub: %s",
                default_model.MODEL_NAME,
                missing,
                unreachable,
            )
            return ModelSource(str(ensure_tiny_model()), TINY_MODEL_NAME, notice=tiny_model_notice())
        log.info("%s: %s; loading %s from the hub", default_model.MODEL_NAME, missing, default_model.HUB_ID)
        return ModelSource(default_model.HUB_ID, default_model.MODEL_NAME, notice=notice, dtype="float32")
    return ModelSource(str(folder), default_model.MODEL_NAME, notice=notice, dtype="float32")


def _looks_like_a_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~", ".\\")) or "\\" in model or model.count("/") > 1


def _hub_source(repo_id: str, token: str | None) -> ModelSource:
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(repo_id, "config.json", cache_dir=constants.HF_HUB_CACHE), str)
    source = ModelSource(repo_id, repo_id)
    if constants.is_offline_mode():
        if cached:
            return source
        raise ConfigError(
            f"--model {repo_id} is not in the hub cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is "
            f"set: download it first (hf download {repo_id}), unset HF_HUB_OFFLINE, or give a model folder"
        )
    problem = _ask_hub(repo_id, token)
    if problem is None:
        return source
    kind, detail = problem
    host = constants.ENDPOINT
    if kind == "missing":
        raise ConfigError(
            f"--model {repo_id}: {host} has no such model (or it is private: give --token); check the name"
        )
    if cached:
        log.warning("%s cannot be reached (%s): loading %s from the hub cache", host, detail, repo_id)
        _stay_offline()
        return source
    raise ConfigError(
        f"--model {repo_id}: {host} cannot be reached ({detail}) and the model is not in the hub cache: "
        f"download it where there is a network (hf download {repo_id}) and copy the cache "
        f"({constants.HF_HUB_CACHE}), or give a model folder"
    )


def _ask_hub(repo_id: str, token: str | None) -> tuple[str, str] | None:
    """None when the hub has the model; else ("missing" or "unreachable", a few words why)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(repo_id, token=token or None, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return None  # the hub has it; the download says whether the token may read it
    except RepositoryNotFoundError:
        return "missing", "no such model"
    except Exception as error:  # no route, no name resolution, a timeout, a proxy's error page
        reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        return "unreachable", reason
    return None


def _stay_offline() -> None:
    """Tell the hub library, here and in processes started from here, to use its cache only: each
    request it would make waits through its retries first."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
