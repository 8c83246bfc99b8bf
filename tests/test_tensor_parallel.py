"""Tensor parallelism on the CPU: the slices and the one-sum-per-layer step, then the real thing.

First every rank of a sharded model runs in a thread of this process, meeting through
`ThreadRanks` (it stands in for torch.distributed's sum and gather, nothing else), over the
Falcon layouts that split differently. Then the app's own backend starts a second process and
the two ranks meet over gloo: greedy output with 2 ranks equals 1 rank (float32, tiny model),
Stop and the next reply work, and a rank that dies turns the backend unhealthy without a hang.
The GPU side (NCCL inside CUDA graphs) is measured by bench/gpu_decode.py --tensor-parallel.
"""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from transformers import FalconConfig

from chat.config import Settings
from chat.conversation.errors import ConfigError, GenerationFailed
from chat.conversation.params import GenerationParams
from chat.engine.decode_loop import FastDecoder
from chat.engine.decoders import PlainDecoder
from chat.engine.int4.products import Int4Reference
from chat.engine.parallel.shards import RankPlan, share
from chat.engine.products import Dense
from chat.engine.weights import CheckpointSource, lay_out

CACHE = 128
GREEDY = GenerationParams(temperature=0.0, max_new_tokens=24)
PROMPTS = ["User: Plan a trip to Lisbon\nFalcon:", "System: Be brief.\nUser: Write a haiku\nFalcon:"]


class ThreadRanks:
    """torch.distributed's sum and gather for ranks running as threads of one process (a double)."""

    def __init__(self, world: int, vocab: int):
        self.world, self.vocab = world, vocab
        self._barrier = threading.Barrier(world, timeout=30)
        self._parts: list = [None] * world
        self.sums = 0  # sums taken by rank 0

    def reduce_for(self, rank: int):
        def reduce(x):
            self.sums += rank == 0
            return self._meet(rank, x, lambda parts: sum(parts[1:], parts[0]))

        return reduce

    def gather_for(self, rank: int):
        return lambda x: self._meet(rank, x, lambda parts: torch.cat(parts, dim=1)[:, : self.vocab])

    def _meet(self, rank, x, combine):
        self._parts[rank] = x
        self._barrier.wait()
        result = combine(list(self._parts))
        self._barrier.wait()  # nobody overwrites a part before everyone has combined
        return result


def _ids(tokenizer, text):
    return torch.tensor([tokenizer(text)["input_ids"]])


def _sharded_greedy(folder, tokenizer, ids, world: int, new_tokens: int, products=Dense, quantize=None):
    """Every rank's generated tokens and rank 0's count of sums, ranks running as threads."""
    source = CheckpointSource(folder, device="cpu", dtype=torch.float32)
    layouts = [
        lay_out(source, max_len=CACHE, products=products, rank=rank, world=world, quantize=quantize)
        for rank in range(world)
    ]
    return _threaded_greedy(layouts, ids, new_tokens, source.config.vocab_size, tokenizer.eos_token_id)


def _threaded_greedy(layouts, ids, new_tokens: int, vocab: int, eos_token_id=None):
    world = len(layouts)
    ranks = ThreadRanks(world, vocab)
    decoders = [
        FastDecoder.from_layout(
            layout, eos_token_id, reduce=ranks.reduce_for(rank), gather=ranks.gather_for(rank)
        )
        for rank, layout in enumerate(layouts)
    ]

    def follow(decoder):
        steps = iter(range(new_tokens - 1))
        decoder.follow(ids, GREEDY, 0, lambda: next(steps, None) is not None)

    threads = [threading.Thread(target=follow, args=(d,)) for d in decoders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    start = ids.shape[-1]
    return [d.history[start : start + new_tokens].tolist() for d in decoders], ranks.sums


LAYOUTS = {
    "tiny-multi-query": dict(multi_query=True, num_attention_heads=4),  # one KV head: queries split
    "new-architecture": dict(
        new_decoder_architecture=True, num_kv_heads=2, num_attention_heads=8
    ),  # KV split
    "new-architecture-one-norm": dict(
        new_decoder_architecture=True, num_kv_heads=2, num_attention_heads=8, num_ln_in_parallel_attn=1
    ),
    "multi-head": dict(multi_query=False, num_attention_heads=4),
    "multi-query-bias": dict(multi_query=True, num_attention_heads=4, bias=True),
}


@pytest.mark.parametrize(
    "layout, world",
    [*((layout, 2) for layout in LAYOUTS), ("tiny-multi-query", 3), ("multi-head", 3)],  # 3: uneven shares
)
def test_every_rank_generates_what_one_device_does_with_one_sum_per_layer(
    tmp_path, tiny_tokenizer, layout, world
):
    from transformers import FalconConfig, FalconForCausalLM

    settings = dict(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        parallel_attn=True,
        alibi=False,
        bias=False,
        initializer_range=0.5,
    )
    torch.manual_seed(1)
    model = FalconForCausalLM(FalconConfig(**{**settings, **LAYOUTS[layout]})).eval()
    model.save_pretrained(tmp_path)
    ids = _ids(tiny_tokenizer, PROMPTS[1])
    expected = []
    PlainDecoder(model, tiny_tokenizer).generate(ids, GREEDY, 0, expected.append, lambda: False)

    per_rank, sums = _sharded_greedy(tmp_path, tiny_tokenizer, ids, world, len(expected))
    assert per_rank == [expected] * world
    # A sum per layer for the prompt and for each step after the first token; nothing else.
    assert sums == model.config.num_hidden_layers * len(expected)


def test_unindexed_shards_with_prefixed_names_load_for_every_path(tmp_path, tiny_model_dir, tiny_tokenizer):
    """Two safetensors files with no index, names under `model.` (as some exports write them): the
    ranks read them as the int4 loader does (one reader, checkpoint.py)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model.config.save_pretrained(tmp_path)
    tensors = {
        f"model.{name}": t.contiguous() for name, t in model.state_dict().items() if name != "lm_head.weight"
    }
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[::2]}, str(tmp_path / "part-a.safetensors"))
    save_file({n: tensors[n] for n in names[1::2]}, str(tmp_path / "part-b.safetensors"))
    ids = _ids(tiny_tokenizer, PROMPTS[0])
    expected = []
    PlainDecoder(model, tiny_tokenizer).generate(ids, GREEDY, 0, expected.append, lambda: False)

    per_rank, _ = _sharded_greedy(tmp_path, tiny_tokenizer, ids, 2, len(expected))
    assert per_rank == [expected] * 2
    int4_source = CheckpointSource(tmp_path, device="cpu", dtype=torch.float32)
    lay_out(int4_source, max_len=CACHE, products=Int4Reference, quantize="hqq")  # reads every tensor


def test_int4_slices_generate_what_the_one_device_int4_path_does(tmp_path, tiny_tokenizer):
    """Each rank quantizes the slices it reads; with int4 groups that fall on the same columns as
    on one device (widths of 128), the ranks hold exactly the one-device int4 model."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(2)
    config = FalconConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        multi_query=True,
        parallel_attn=True,
        alibi=False,
        bias=False,
        initializer_range=0.3,
    )
    FalconForCausalLM(config).eval().save_pretrained(tmp_path)
    ids = _ids(tiny_tokenizer, PROMPTS[0])
    one = CheckpointSource(tmp_path, device="cpu", dtype=torch.float32)
    decoder = FastDecoder.from_layout(lay_out(one, max_len=CACHE, products=Int4Reference, quantize="hqq"), 0)
    expected = []
    decoder.generate(ids, GREEDY, 0, expected.append, lambda: False)

    per_rank, _ = _sharded_greedy(tmp_path, tiny_tokenizer, ids, 2, len(expected), Int4Reference, "hqq")
    assert per_rank == [expected] * 2


def _int4_spec(drawn: bool, world: int = 2):
    from bench.random_weights import RandomWeights
    from chat.engine.parallel.ranks import RankSpec, free_port

    config = FalconConfig(
        vocab_size=512,
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_kv_heads=2,
        new_decoder_architecture=True,
        parallel_attn=True,
        alibi=False,
        bias=False,
        initializer_range=0.3,
    )
    return RankSpec(
        world=world,
        port=free_port(),
        max_len=CACHE,
        eos_token_id=None,
        weights=RandomWeights(config.to_dict(), int4=drawn),
        products="int4",
    )


def test_int4_drawn_directly_never_makes_the_products_in_bf16():
    """`--int4-weights random` (bench/gpu_decode.py, for 180B): the source draws the products'
    slices directly in int4 and each rank lays them out; the ranks still meet per layer."""
    from chat.engine.parallel.ranks import rank_layout

    spec = _int4_spec(drawn=True)
    source = spec.weights.open("cpu", torch.float32)
    assert source.quantized("transformer.h.0.mlp.dense_4h_to_h.weight")
    assert not source.quantized("transformer.word_embeddings.weight")  # one row a token: kept dense
    layouts = [rank_layout(spec, rank, "cpu", torch.float32) for rank in range(2)]
    packed, scale, offset, bias = layouts[0].layers[0].w_out  # Int4Reference's: levels, scale, offset
    assert packed.dtype == torch.uint8 and packed.shape == (256, (128 + 512) // 2) and scale.shape == (256, 5)
    per_rank, sums = _threaded_greedy(layouts, torch.tensor([[5, 17, 300, 42]]), 12, vocab=512)
    assert per_rank[0] == per_rank[1] and len(per_rank[0]) == 12
    assert sums == 2 * 12


def test_slices_cover_every_row_and_column_once():
    from chat.engine.families import Shape

    seven_b = Shape(hidden=4544, heads=71, kv_heads=1, head_dim=64, vocab=65024, layers=32, eps=1e-5)
    plans = [RankPlan.make(seven_b, rank, 2) for rank in range(2)]
    assert [len(p.queries) for p in plans] == [36, 35]  # 71 queries, one shared KV head
    columns = sorted(c for p in plans for r in p.attention_columns for c in r)
    assert columns == list(range(71 * 64))
    assert [share(10, 3, r) for r in range(3)] == [range(0, 4), range(4, 7), range(7, 10)]
    forty_b = Shape(hidden=8192, heads=128, kv_heads=8, head_dim=64, vocab=65024, layers=60, eps=1e-5)
    plan = RankPlan.make(forty_b, 1, 2)
    assert plan.kv_heads == range(4, 8) and len(plan.qkv_rows) == 1  # whole groups: one read


class StepDone:
    """Stands in for the CUDA event rank 0 waits on for a token (no GPU here): it happens when
    `happen()` is called; `synchronize` blocks as a blocking-sync CUDA event does."""

    def __init__(self):
        self._done = threading.Event()
        self.queries = 0

    def happen(self):
        self._done.set()

    def query(self) -> bool:
        self.queries += 1
        return self._done.is_set()

    def synchronize(self) -> None:
        self._done.wait()


@pytest.mark.parametrize("abortable", [True, False], ids=["nccl-abort", "no-abort"])
def test_rank_0_waits_for_a_token_without_spinning_a_core(monkeypatch, abortable):
    import multiprocessing
    import time

    from chat.engine.parallel.ranks import RANK_POLL_S, Peers, RankDied

    monkeypatch.setattr(Peers, "_sums_abortable", staticmethod(lambda: abortable))
    peers = Peers([], [])
    step = StepDone()
    threading.Timer(0.4, step.happen).start()
    cpu, wall = time.thread_time(), time.monotonic()
    peers.wait_for(step)
    cpu, wall = time.thread_time() - cpu, time.monotonic() - wall
    assert wall >= 0.35 and cpu < 0.1 * wall, f"{cpu:.3f} s of CPU in {wall:.3f} s"
    if abortable:  # asleep in the driver until the token is there (a death aborts NCCL: it ends)
        assert step.queries == 0
    else:  # a look every RANK_POLL_S, asleep in between
        assert step.queries <= 1.2 * wall / RANK_POLL_S + 1

    ended = multiprocessing.get_context("fork").Process(target=int)
    ended.start()
    ended.join()
    with pytest.raises(RankDied, match="rank 1"):  # the token came, but a rank is gone
        Peers([ended], [None]).wait_for(step)


# -- two processes over gloo ---------------------------------------------------------------------------


def test_two_rank_processes_quantizing_their_slices_give_the_greedy_tokens_of_one():
    """bench/gpu_decode.py --tensor-parallel 2 --quantize int4: each rank process draws the seeded
    model and quantizes (HQQ) the slices it keeps; 2 ranks over gloo give 1 rank's greedy tokens."""
    from dataclasses import replace

    from chat.engine.parallel.ranks import rank_layout, start_ranks

    spec = _int4_spec(drawn=False)
    ids = torch.tensor([[5, 17, 300, 42, 9]])
    expected = []
    one = FastDecoder.from_layout(rank_layout(replace(spec, world=1), 0, "cpu", torch.float32), None)
    one.generate(ids, GREEDY, 0, expected.append, lambda: False)
    decoder = start_ranks(spec)
    try:
        streamed = []
        decoder.generate(ids, GREEDY, 0, streamed.append, lambda: False)
        assert streamed == expected
        assert set(decoder.peers.loaded) == {0, 1}  # each rank's load report reached rank 0
    finally:
        decoder.close()


# -- two processes over gloo, through the app's own factory -------------------------------------------


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir):
    from chat.factory import build_backend

    backend = build_backend(Settings(model=str(tiny_model_dir), tensor_parallel=2, max_total_tokens=CACHE))
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def one_rank(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return FastDecoder(model, tiny_tokenizer, max_len=CACHE)


def _streamed_ids(backend, prompt, params):
    return [token.id for token in backend.stream(prompt, params) if token.id is not None]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_two_ranks_stream_the_greedy_tokens_of_one(two_ranks, one_rank, tiny_tokenizer, prompt):
    expected = []
    one_rank.generate(_ids(tiny_tokenizer, prompt), GREEDY, 0, expected.append, lambda: False)
    assert "tensor parallel" in two_ranks.name
    assert _streamed_ids(two_ranks, prompt, GREEDY) == expected


def test_two_ranks_stop_and_serve_the_next_reply(two_ranks):
    sampled = GenerationParams(temperature=0.9, top_p=0.9, max_new_tokens=16, seed=5)
    first = _streamed_ids(two_ranks, PROMPTS[0], sampled)
    stream = two_ranks.stream(PROMPTS[0], GenerationParams(temperature=0.0, max_new_tokens=100))
    next(stream)
    stream.close()  # Stop: rank 0 ends the reply, the other rank must end it too
    assert _streamed_ids(two_ranks, PROMPTS[0], sampled) == first  # in step again, same seed, same reply
    assert two_ranks.healthy()


def test_tensor_parallel_needs_the_fast_decoder_and_our_own_int4(tiny_model_dir):
    from chat.factory import build_backend

    with pytest.raises(ConfigError, match="--decoder plain"):
        build_backend(Settings(model=str(tiny_model_dir), tensor_parallel=2, decoder="plain"))
    with pytest.raises(ConfigError, match="bitsandbytes"):
        build_backend(Settings(model=str(tiny_model_dir), tensor_parallel=2, quantize="8bit"))


def test_a_dead_rank_fails_the_reply_and_the_health_check_without_a_hang(two_ranks, caplog):
    """Last in this file: it ends the module's two ranks."""
    process = two_ranks.decoder.peers.processes[0]
    with caplog.at_level(logging.ERROR):
        process.kill()
        process.join(timeout=10)
        with pytest.raises(GenerationFailed):
            list(two_ranks.stream(PROMPTS[0], GREEDY))
    assert not two_ranks.healthy()
    assert any("rank 1" in r.getMessage() and "restarted" in r.getMessage() for r in caplog.records)
