"""The memory plan counts parameters with transformers' own Falcon (on the meta device)."""

from bench.memory_plan import SHAPES, kv_bytes_per_token, parameters, plan


def test_parameter_counts_match_the_published_model_sizes():
    # Published: Falcon-7B 6.9 B, Falcon-40B 41.3 B (model cards), Falcon-180B "180B".
    assert 6.8e9 < parameters(SHAPES["falcon-7b"]) < 7.0e9
    assert 41.0e9 < parameters(SHAPES["falcon-40b"]) < 41.5e9
    assert 178e9 < parameters(SHAPES["falcon-180b"]) < 180e9


def test_kv_cache_and_gpu_counts_for_falcon_180b():
    assert kv_bytes_per_token(SHAPES["falcon-180b"]) == 2 * 80 * 8 * 64 * 2
    layouts = plan("falcon-180b", conversations=8)["layouts"]
    assert layouts["bf16 on H200 141GB"]["gpus"] == 3  # 357 GB of weights
    assert layouts["4bit on H200 141GB"]["gpus"] == 1
