"""A model folder is input: its config cannot size our allocations, and `--save-quantized` writes
a new folder whole or not at all (chat/engine/limits.py, chat/engine/new_folder.py; issue #24).

Each bad folder is the tiny Falcon's with one thing changed; each must end in one sentence
(ConfigError), before anything large is allocated.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from chat.config import Settings
from chat.conversation.errors import ConfigError
from chat.engine import limits
from chat.factory import build_backend


@pytest.fixture
def folder_with(tmp_path, tiny_model_dir):
    """A copy of the tiny model's folder with its config.json changed."""

    def make(**changes):
        folder = tmp_path / "model"
        shutil.copytree(tiny_model_dir, folder)
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    return make


def _digest(folder) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (dict(num_hidden_layers=100_000), "num_hidden_layers is 100000"),
        (dict(hidden_size=-64), "hidden_size is -64"),
        (dict(vocab_size="many"), 'vocab_size is "many"'),
        (dict(num_attention_heads=4.5), "num_attention_heads is 4.5"),
        (dict(num_hidden_layers=1_000), "describes 1,000 layers"),  # within bounds; not these weights
        (dict(hidden_size=8_192, num_attention_heads=128), "does not belong to these weights"),
    ],
)
@pytest.mark.parametrize("quantize", [None, "int4"])
def test_a_config_that_does_not_fit_its_weights_is_refused_in_one_sentence_at_once(
    folder_with, change, words, quantize
):
    folder = folder_with(**change)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=words) as refused:
        build_backend(Settings(model=str(folder), quantize=quantize))
    assert time.perf_counter() - start < 10  # before: 75 s building 100,000 layers, then MemoryError
    assert "\n" not in refused.value.user_message


def test_the_context_a_config_claims_sizes_the_cache_only_up_to_a_bound(folder_with):
    backend = build_backend(
        Settings(model=str(folder_with(max_position_embeddings=9_999_999)), quantize="int4")
    )
    try:
        assert backend.context_length() == limits.MAX_CONFIG_CONTEXT  # before: 9,999,999 (5.2 GB)
        assert backend.decoder.layout.layers[0].k_cache.shape[1] == limits.MAX_CONFIG_CONTEXT
    finally:
        backend.close()


def test_weights_and_a_cache_that_do_not_fit_the_free_memory_are_refused(folder_with, monkeypatch):
    monkeypatch.setattr(limits, "free_memory", lambda cuda, all_gpus: 64 << 20)
    folder = folder_with()
    with pytest.raises(
        ConfigError,
        match=r"needs about .* a 1,000,000-token cache\) .* free: a --max-total-tokens of [\d,]+ fits",
    ):
        build_backend(Settings(model=str(folder), quantize="int4", max_total_tokens=1_000_000))
    backend = build_backend(Settings(model=str(folder), quantize="int4", max_total_tokens=4_096))
    backend.close()


def test_a_bad_folder_ends_the_start_with_one_line_not_a_traceback(folder_with):
    folder = folder_with(num_hidden_layers=100_000)
    result = subprocess.run(
        [sys.executable, "app.py", "--model", str(folder), "--port", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("app.py: error:") and "num_hidden_layers" in lines[-1]
    assert "Traceback" not in result.stderr


# -- --save-quantized --------------------------------------------------------------------------------


def test_save_quantized_refuses_an_existing_folder_and_a_planted_link_before_loading(
    tmp_path, tiny_model_dir
):
    existing = tmp_path / "existing"
    existing.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    planted = tmp_path / "planted"
    planted.symlink_to(outside, target_is_directory=True)
    for target in (existing, planted):
        with pytest.raises(ConfigError, match="exists: give a new folder"):
            build_backend(Settings(model=str(tiny_model_dir), quantize="int4", save_quantized=str(target)))
    assert list(existing.iterdir()) == []
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"]


def test_save_quantized_refuses_the_model_folder_itself_and_leaves_it_unchanged(tmp_path, tiny_model_dir):
    source = tmp_path / "model"
    shutil.copytree(tiny_model_dir, source)
    before = _digest(source)
    for target in (source, tmp_path / "." / "model"):
        with pytest.raises(ConfigError, match="is the model's own folder"):
            build_backend(Settings(model=str(source), quantize="int4", save_quantized=str(target)))
    assert _digest(source) == before


def test_save_quantized_writes_a_new_folder_whole_or_not_at_all(tmp_path, tiny_model_dir, monkeypatch):
    from chat.engine.int4 import saved as int4_saved

    saved = tmp_path / "saved"
    real_write = int4_saved.Int4Writer._write

    def write_then_fail(writer):
        real_write(writer)  # a shard is on disk, then the disk is full
        raise OSError("disk full")

    monkeypatch.setattr(int4_saved.Int4Writer, "_write", write_then_fail)
    with pytest.raises(ConfigError, match="disk full"):
        build_backend(Settings(model=str(tiny_model_dir), quantize="int4", save_quantized=str(saved)))
    assert list(tmp_path.iterdir()) == []  # no target, no partial folder
    monkeypatch.setattr(int4_saved.Int4Writer, "_write", real_write)
    build_backend(Settings(model=str(tiny_model_dir), quantize="int4", save_quantized=str(saved))).close()
    assert (
        int4_saved.is_saved(saved)
        and (saved / "config.json").is_file()
        and (saved / "tokenizer.json").is_file()
    )
    assert (saved.stat().st_mode & 0o777) == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]
