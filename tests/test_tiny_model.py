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
