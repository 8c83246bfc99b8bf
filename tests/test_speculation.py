"""Speculative decoding in the fast decoder (chat/engine/speculation.py), on the CPU in float32.

What must hold: greedy replies are the non-speculative ones token for token, whatever the
proposer; sampled replies repeat by seed and have the non-speculative distribution (tested against
the exact probabilities, with the test's power stated and checked); Stop and the length limits
end a reply where they end it without speculation.
"""

from __future__ import annotations

import functools

import pytest
import torch

from bench.scripted_proposer import ScriptedProposer
from chat.conversation.backend import FINISH_CANCELLED, FINISH_LENGTH
from chat.conversation.params import GenerationParams
from chat.engine.decode_loop import FastDecoder
from chat.engine.sampling import Knobs, penalize, sampling_probs
from chat.engine.speculation import DraftModel, PromptLookup, WidthChooser, accept
from tests.helpers import decode as run

CACHE = 128
GREEDY = GenerationParams(temperature=0.0, max_new_tokens=32)
PENALIZED = GenerationParams(temperature=0.0, repetition_penalty=1.5, max_new_tokens=32)
SAMPLED = GenerationParams(temperature=0.9, top_p=0.9, top_k=40, repetition_penalty=1.1, max_new_tokens=24)
PROMPTS = [
    "User: Plan a trip to Lisbon\nFalcon:",
    "System: Be brief.\nUser: Write a haiku\nFalcon:",
    "User: Give me a recipe for a simple tomato soup.\nFalcon:",
    'User: Translate "I love the sea" into French.\nFalcon: J\'aime la mer.\nUser: And the mountains?\nFalcon:',
    "User: Turn this email into a table\nFalcon: | name | date |\n| Alice |",
    "User: the sea the sea the sea the sea\nFalcon: the sea",
]


def _load(folder, noise: float = 0.0):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if noise:  # a draft that agrees with the model often, not always
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * noise * parameter.std())
    return model


def _ids(tokenizer, text):
    return torch.tensor([tokenizer(text)["input_ids"]])


@pytest.fixture(scope="module")
def plain(tiny_model_dir, tiny_tokenizer):
    """The fast decoder without speculation: the reference every speculative reply must equal."""
    return FastDecoder(_load(tiny_model_dir), tiny_tokenizer, max_len=CACHE)


@pytest.fixture(scope="module")
def target(tiny_model_dir, tiny_tokenizer):
    """A second fast decoder over the same model, which the tests give proposers to."""
    return FastDecoder(_load(tiny_model_dir), tiny_tokenizer, max_len=CACHE)


@pytest.fixture(scope="module")
def noisy_draft(tiny_model_dir, tiny_tokenizer):
    """The tiny model with noise added to its weights: it often agrees with the model, not always."""
    return FastDecoder(_load(tiny_model_dir, noise=0.3), tiny_tokenizer, max_len=CACHE)


@pytest.fixture(scope="module")
def very_noisy_draft(tiny_model_dir, tiny_tokenizer):
    return FastDecoder(_load(tiny_model_dir, noise=0.5), tiny_tokenizer, max_len=CACHE)


@pytest.fixture(scope="module")
def same_draft(tiny_model_dir, tiny_tokenizer):
    """The model itself as its own draft: every proposal is the model's own choice."""
    return FastDecoder(_load(tiny_model_dir), tiny_tokenizer, max_len=CACHE)


def speculating(decoder, proposer, widths=(2, 3, 4, 6, 8)):
    decoder.speculate(proposer, widths)
    return decoder


# -- the proposers and k ----------------------------------------------------------------------------


def test_prompt_lookup_proposes_what_followed_the_latest_match_of_the_longest_ngram():
    lookup = PromptLookup()
    lookup.start(None, [5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 3, 6, 7], None)
    # "6 7" last came before "1 2 3"; the trigram "3 6 7" never came before.
    assert lookup.lookup(3) == [1, 2, 3]
    assert lookup.lookup(1) == [1]
    lookup.extend([1])  # "6 7 1" matches the trigram that came before "2 3"
    assert lookup.lookup(4) == [2, 3, 6, 7]
    lookup.extend([4])
    assert lookup.lookup(4) == []  # 4 never came before


def test_the_width_grows_with_acceptance_and_falls_to_a_plain_step_without_it():
    chooser = WidthChooser([1, 3, 5, 7], draft_cost=0.1)
    for _ in range(20):
        chooser.update(proposed=7, accepted=7)
    assert chooser.choose(limit=7) == 7
    assert chooser.choose(limit=4) == 3  # no width past the room left
    for _ in range(40):
        chooser.update(proposed=3, accepted=0)
    assert chooser.choose(limit=7) == 0


# -- greedy: the non-speculative tokens, whatever is proposed ---------------------------------------


@pytest.mark.parametrize("params", [GREEDY, PENALIZED], ids=["greedy", "repetition-penalty"])
@pytest.mark.parametrize("proposer", ["prompt lookup", "noisy draft", "scripted"])
def test_greedy_speculation_writes_the_tokens_of_plain_decoding(
    tiny_tokenizer, plain, target, noisy_draft, params, proposer
):
    expected = {prompt: run(plain, _ids(tiny_tokenizer, prompt), params) for prompt in PROMPTS}
    totals = [0, 0]
    for prompt in PROMPTS:
        if proposer == "prompt lookup":
            made = PromptLookup()
        elif proposer == "noisy draft":
            made = DraftModel(noisy_draft)
        else:  # the reply itself, each token kept with probability 0.7
            made = ScriptedProposer(expected[prompt][0], 0.7, vocab=len(tiny_tokenizer), seed=len(prompt))
        decoder = speculating(target, made)
        assert run(decoder, _ids(tiny_tokenizer, prompt), params) == expected[prompt], prompt
        totals[0] += decoder.speculation.proposed
        totals[1] += decoder.speculation.accepted
    proposed, accepted = totals
    assert accepted < proposed  # rejections were taken
    if not (proposer == "prompt lookup" and params is PENALIZED):  # random weights, penalised: no repeats
        assert accepted > 0  # and acceptances


def test_a_draft_that_is_the_model_itself_has_every_proposal_accepted(
    tiny_tokenizer, plain, target, same_draft
):
    decoder = speculating(target, DraftModel(same_draft))
    ids = _ids(tiny_tokenizer, PROMPTS[0])
    for params in (GREEDY, SAMPLED):
        tokens, _ = run(decoder, ids, params, seed=3)
        stats = decoder.speculation
        assert stats.accepted == stats.proposed > 0
        assert stats.steps < len(tokens) / 3  # several tokens a step
    assert run(decoder, ids, GREEDY) == run(plain, ids, GREEDY)
    decoder.speculate(None)  # one token a step again, and no figures of speculation
    assert run(decoder, ids, GREEDY) == run(plain, ids, GREEDY) and decoder.speculation is None


# -- sampling: reproducible, and the distribution of plain sampling --------------------------------


@pytest.mark.parametrize("proposer", ["prompt lookup", "noisy draft"])
def test_seeded_speculative_sampling_repeats(tiny_tokenizer, target, noisy_draft, proposer):
    made = PromptLookup() if proposer == "prompt lookup" else DraftModel(noisy_draft)
    decoder = speculating(target, made)
    ids = _ids(tiny_tokenizer, PROMPTS[5])
    first = run(decoder, ids, SAMPLED, seed=7)
    assert run(decoder, ids, SAMPLED, seed=7) == first
    assert run(decoder, ids, SAMPLED, seed=8) != first


@functools.cache
def _chi_square_critical(df: int, alpha: float) -> float:
    """The chi-square quantile 1 - alpha, by bisection on its CDF (torch's regularized gamma)."""
    low, high = 0.0, 1000.0
    for _ in range(100):
        middle = (low + high) / 2
        cdf = torch.special.gammainc(
            torch.tensor(df / 2, dtype=torch.float64), torch.tensor(middle / 2)
        ).item()
        low, high = (middle, high) if cdf < 1 - alpha else (low, middle)
    return high


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom, cells expecting fewer than 5 pooled into one."""
    expected = probs.double() * counts.sum()
    small = expected < 5
    observed = torch.cat((counts[~small].double(), counts[small].double().sum().reshape(1)))
    expected = torch.cat((expected[~small], expected[small].sum().reshape(1)))
    keep = expected > 0
    observed, expected = observed[keep], expected[keep]
    return ((observed - expected) ** 2 / expected).sum().item(), int(keep.sum()) - 1


def _power(probs, alternative, draws: int, alpha: float, trials: int = 400) -> float:
    """How often the test rejects samples of `draws` drawn from `alternative` (simulated)."""
    generator = torch.Generator().manual_seed(11)
    rejected = 0
    for _ in range(trials):
        counts = torch.multinomial(alternative, draws, replacement=True, generator=generator).bincount(
            minlength=len(probs)
        )
        statistic, df = _chi_square(counts, probs)
        rejected += statistic > _chi_square_critical(df, alpha)
    return rejected / trials


@pytest.fixture
def one_thread():
    """Thousands of tiny replies: torch's thread pool costs more than it gives on 2-row products."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ALPHA = 1e-3  # a false alarm once in a thousand runs


@pytest.mark.parametrize("draft", ["sampled q", "one-hot q"])
def test_the_acceptance_rule_keeps_the_model_distribution_with_stated_power(one_thread, draft):
    """`accept` alone, over fixed model rows p and a proposer's q: the first token has p_0's
    distribution, and after an accepted first proposal the second has p_1's. 6,000 steps;
    the same test rejects the classic mistake (a rejected row redrawn from p, not from the
    residual max(p - q, 0)) with the power computed and checked below."""
    vocab, draws = 6, 6_000
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(3, vocab, generator=generator) * 1.5
    knobs = Knobs("cpu")
    knobs.set(GenerationParams(temperature=1.0, top_p=1.0, top_k=0), vocab)
    not_last = torch.ones(vocab, dtype=torch.bool)
    not_last[-1] = False
    p = sampling_probs(scores, knobs.tensors(), not_last)
    if draft == "sampled q":
        q = torch.softmax(torch.randn(2, vocab, generator=generator) * 1.5, -1)
    else:
        q = torch.nn.functional.one_hot(torch.tensor([1, 4]), vocab).float()  # proposals fixed
    torch.manual_seed(1)
    first, second = torch.zeros(vocab, dtype=torch.long), torch.zeros(vocab, dtype=torch.long)
    history = torch.zeros(8, dtype=torch.long)
    for _ in range(draws):
        proposals = torch.multinomial(q, 1)[:, 0]
        history[2:4] = proposals
        pos, accepted = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        seen = torch.zeros(vocab, dtype=torch.bool)
        accept(
            scores, seen, knobs.tensors(), not_last, False, history, pos, torch.tensor([2]),
            None if draft == "one-hot q" else q, accepted,
        )  # fmt: skip
        first[history[2]] += 1
        if accepted.item() >= 1:
            second[history[3]] += 1
    for counts, row in ((first, 0), (second, 1)):
        statistic, df = _chi_square(counts, p[row])
        assert statistic < _chi_square_critical(df, ALPHA), (row, counts, p[row] * counts.sum())
    # The power against the classic mistake, for the first token: P(d kept) + P(rejected) * p.
    kept = torch.minimum(p[0], q[0])
    mistaken = kept + (1 - kept.sum()) * p[0]
    assert _power(p[0], mistaken, draws, ALPHA) >= 0.95


def _exact_joint(model, prompt_ids, params, depth: int) -> dict[tuple, float]:
    """P(first `depth` new tokens) under non-speculative sampling, from the model's own logits
    processed as `sampling.choose` processes them: every sequence with probability > 0."""
    vocab = model.config.vocab_size
    knobs = Knobs("cpu")
    knobs.set(params, vocab)
    not_last = torch.ones(vocab, dtype=torch.bool)
    not_last[-1] = False
    joint = {(): 1.0}
    for _ in range(depth):
        grown = {}
        for prefix, probability in joint.items():
            ids = torch.cat((prompt_ids[0], torch.tensor(prefix, dtype=torch.long)))
            with torch.no_grad():
                logits = model(ids[None]).logits[0, -1].float()
            seen = torch.zeros(vocab, dtype=torch.bool)
            seen[ids] = True
            penalized = torch.where(seen, penalize(logits, knobs.penalty), logits)
            probs = sampling_probs(penalized, knobs.tensors(), not_last)
            for token in probs.nonzero()[:, 0].tolist():
                grown[(*prefix, token)] = probability * probs[token].item()
        joint = grown
    return joint


@pytest.mark.parametrize("proposer", ["noisy draft", "fixed proposals"])
def test_speculative_sampling_has_the_distribution_of_plain_sampling(
    tiny_model_dir, tiny_tokenizer, plain, target, very_noisy_draft, one_thread, proposer
):
    """The first three tokens of 1,500 seeded replies (top-k 3, so 27 sequences; repetition
    penalty 1.3, so the second proposal's row must count the first) against their exact
    probabilities. The second and third come from a verify step over two proposals: a noisy
    draft's samples (its q), or the greedy reply's tokens (q one-hot, as prompt lookup's).
    Power: checked below against 15% of the probability moved to the most likely sequence."""
    params = GenerationParams(temperature=1.0, top_k=3, top_p=1.0, repetition_penalty=1.3, max_new_tokens=4)
    ids = _ids(tiny_tokenizer, PROMPTS[0])
    exact = _exact_joint(_load(tiny_model_dir), ids, params, depth=3)
    if proposer == "noisy draft":
        made = DraftModel(very_noisy_draft)
    else:
        greedy = run(plain, ids, GenerationParams(temperature=0.0, max_new_tokens=8))[0]
        made = ScriptedProposer(greedy, 1.0, vocab=len(tiny_tokenizer))
    decoder = speculating(target, made, widths=(2, 3))
    cells = {sequence: i for i, sequence in enumerate(exact)}
    counts = torch.zeros(len(cells), dtype=torch.long)
    draws, proposed, accepted = 1_500, 0, 0
    for seed in range(draws):
        tokens, _ = run(decoder, ids, params, seed=seed)
        counts[cells[tuple(tokens[:3])]] += 1
        proposed += decoder.speculation.proposed
        accepted += decoder.speculation.accepted
    assert 0 < accepted < proposed
    probs = torch.tensor(list(exact.values()), dtype=torch.float64)
    statistic, df = _chi_square(counts, probs)
    assert statistic < _chi_square_critical(df, ALPHA)
    shifted = probs * 0.85
    shifted[probs.argmax()] += 0.15
    assert _power(probs, shifted, draws, ALPHA) >= 0.9


# -- where a reply ends -----------------------------------------------------------------------------


def test_stop_ends_a_speculative_reply_within_one_token(tiny_tokenizer, target, same_draft):
    # A draft that is the model: each step yields up to 8 tokens; Stop still cuts after 3.
    decoder = speculating(target, DraftModel(same_draft))
    tokens, reason = run(decoder, _ids(tiny_tokenizer, PROMPTS[0]), GREEDY, stop_after=3)
    assert (len(tokens), reason) == (3, FINISH_CANCELLED)


def test_max_new_tokens_and_the_end_of_the_cache_end_a_speculative_reply(
    tiny_model_dir, tiny_tokenizer, plain, target, same_draft
):
    ids = _ids(tiny_tokenizer, PROMPTS[0])
    decoder = speculating(target, DraftModel(same_draft))
    five = GenerationParams(temperature=0.0, max_new_tokens=5)
    assert run(decoder, ids, five) == run(plain, ids, five) == (run(plain, ids, five)[0], FINISH_LENGTH)
    assert len(run(decoder, ids, five)[0]) == 5
    short = ids.shape[-1] + 4
    draft = DraftModel(FastDecoder(_load(tiny_model_dir), tiny_tokenizer, max_len=short))
    decoder = speculating(FastDecoder(_load(tiny_model_dir), tiny_tokenizer, max_len=short), draft)
    tokens, reason = run(decoder, ids, GREEDY)
    assert (len(tokens), reason) == (4, FINISH_LENGTH)
    assert tokens == run(plain, ids, GREEDY)[0][:4]


def test_speculation_refuses_tensor_parallel_slices(tiny_model_dir, tiny_tokenizer):
    decoder = FastDecoder(_load(tiny_model_dir), tiny_tokenizer, max_len=CACHE)
    decoder.reduce = lambda x: x  # a rank's sum across ranks, as under tensor parallelism
    with pytest.raises(ValueError, match="tensor parallelism"):
        decoder.speculate(PromptLookup())


def test_the_reply_figures_say_how_many_proposed_tokens_were_accepted(tiny_tokenizer, target, same_draft):
    from chat.backends.local.backend import LocalBackend
    from chat.engine.build import Engine
    from chat.web.handlers import stats_line
    from tests.helpers import reply_with_stats

    decoder = speculating(target, DraftModel(same_draft))
    backend = LocalBackend(Engine(tiny_tokenizer, decoder, CACHE, "tiny, speculating"), model_name="tiny")
    try:
        _, stats = reply_with_stats(backend, "Plan a trip", params=GREEDY)
    finally:
        backend.close()
    assert stats.proposed_tokens == stats.accepted_tokens == decoder.speculation.accepted > 0
    assert f"{stats.accepted_tokens} of {stats.proposed_tokens} proposed tokens accepted" in stats_line(stats)
    assert stats.as_dict()["accepted_tokens"] == stats.accepted_tokens  # /reply_stats and the log


# -- the app: --speculate and --draft-model ----------------------------------------------------------


def test_speculation_flags_are_checked_together():
    from chat.config import load_settings
    from chat.conversation.errors import ConfigError

    assert load_settings([], environ={"SPECULATE": "ngram"}).speculate == "ngram"
    given = load_settings(["--speculate", "draft", "--draft-model", "/models/small"], environ={})
    assert (given.speculate, given.draft_model) == ("draft", "/models/small")
    for argv, words in (
        (["--speculate", "draft"], "go together"),
        (["--draft-model", "/models/small"], "go together"),
        (["--speculate", "ngram", "--decoder", "plain"], "--decoder plain"),
        (["--speculate", "sometimes"], "--speculate must be one of off, ngram, draft"),
    ):
        with pytest.raises(ConfigError, match=words):
            load_settings(argv, environ={})


@pytest.fixture(scope="module")
def small_draft_dir(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    """A smaller Falcon (one layer, hidden 32) with the tiny model's tokenizer: a draft whose step
    reads under a third of the model's bytes, so the width chooser finds proposing worth it."""
    import shutil

    from transformers import FalconConfig, FalconForCausalLM

    folder = tmp_path_factory.mktemp("draft")
    torch.manual_seed(3)
    config = FalconConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        multi_query=True,
        parallel_attn=True,
        alibi=False,
        bias=False,
    )
    FalconForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model_dir / name).exists():
            shutil.copyfile(tiny_model_dir / name, folder / name)
    return folder


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_the_app_speculates_with_prompt_lookup_or_a_draft_model(tiny_model_dir, small_draft_dir, quantize):
    from chat.config import Settings
    from chat.factory import build_backend

    params = GenerationParams(temperature=0.0, max_new_tokens=24)
    replies = {}
    for speculate, draft in (("off", None), ("ngram", None), ("draft", str(small_draft_dir))):
        backend = build_backend(
            Settings(model=str(tiny_model_dir), quantize=quantize, speculate=speculate, draft_model=draft)
        )
        try:
            tokens = list(backend.stream("User: Plan a trip\nFalcon:", params))
        finally:
            backend.close()
        replies[speculate] = [t.id for t in tokens if t.id is not None], tokens[-1].speculation
    assert replies["ngram"][0] == replies["draft"][0] == replies["off"][0]  # the same reply
    assert replies["draft"][1][0] > 0  # the draft proposed
    assert replies["off"][1] is None and replies["ngram"][1] is not None


def test_a_draft_model_of_another_tokenizer_is_refused(tiny_model_dir, smollm2_dir):
    from chat.config import Settings
    from chat.conversation.errors import ConfigError
    from chat.factory import build_backend

    with pytest.raises(ConfigError, match="does not share the model's tokenizer"):
        build_backend(Settings(model=str(tiny_model_dir), speculate="draft", draft_model=str(smollm2_dir)))


# -- SmolLM2-135M-Instruct's trained weights (tests/real_model.py) ----------------------------------


def test_greedy_prompt_lookup_on_smollm2_writes_the_tokens_of_plain_decoding(smollm2_dir):
    """A real model, whose replies quote their prompts: prompt lookup proposes and is accepted,
    and every reply is the non-speculative fast decoder's, token for token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.speculation_acceptance import tasks

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)

    def decoder():
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
        return FastDecoder(model, tokenizer, max_len=384)  # the eager CPU attention reads it all

    plain, speculating = decoder(), decoder()
    speculating.speculate(PromptLookup())
    params = GenerationParams(temperature=0.0, max_new_tokens=32)
    accepted = 0
    for name, (messages, start) in tasks().items():
        if name == "summary":  # the longest prompt; the other two are enough here
            continue
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + start
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        assert run(speculating, ids, params) == run(plain, ids, params)
        accepted += speculating.speculation.accepted
    assert accepted > 20
