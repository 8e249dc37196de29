"""common.buckets: the few compiled shapes (jax programs, torch CUDA graphs) that cover every length.

What its docstrings promise: geometric buckets (powers of two; cache rows optionally 1.5 times one
too), prompts from 16, cache rows from 128 (or the caller's floor), batch sizes from 1; every
bucket at least what it covers and at most max_positions, so a handful of shapes reach 40960
(Qwen3's max_position_embeddings)."""

from __future__ import annotations

import pytest

from common.buckets import (MIN_CACHE_ROWS, MIN_PROMPT, batch_bucket, cache_bucket, pow2_at_least,
                            prompt_bucket)

MAX = 40960  # Qwen3's max_position_embeddings


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def test_pow2_at_least():
    assert [pow2_at_least(n) for n in (0, 1, 2, 3, 4, 5, 1000, 1024, 1025)] == [1, 1, 2, 4, 4, 8, 1024, 1024, 2048]
    assert pow2_at_least(3, floor=16) == 16 and pow2_at_least(17, floor=16) == 32


def test_batch_buckets_are_powers_of_two_from_one():
    assert [batch_bucket(b) for b in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, 16]
    assert batch_bucket(129) == 256


def test_a_handful_of_buckets_reach_max_positions():
    prompts = sorted({prompt_bucket(n, MAX) for n in range(1, MAX + 1)})
    assert prompts == [MIN_PROMPT << i for i in range(12)] + [MAX], prompts  # 16 .. 32768, then the cap
    cache = sorted({cache_bucket(n, MAX) for n in range(1, MAX + 1)})
    assert cache == [MIN_CACHE_ROWS << i for i in range(9)] + [MAX], cache  # 128 .. 32768, then the cap
    half = sorted({cache_bucket(n, MAX, half_steps=True) for n in range(1, MAX + 1)})
    assert len(half) <= 2 * len(cache), half
    assert half[:6] == [128, 192, 256, 384, 512, 768] and half[-3:] == [24576, 32768, MAX], half
    for b in half[:-1]:
        assert _is_pow2(b) or (b % 3 == 0 and _is_pow2(b // 3)), f"cache bucket {b}: not 2^k or 1.5 x 2^k"


@pytest.mark.parametrize("bucket", [
    lambda n, m: prompt_bucket(n, m),
    lambda n, m: cache_bucket(n, m),
    lambda n, m: cache_bucket(n, m, half_steps=True),
    lambda n, m: cache_bucket(n, m, floor=256),
], ids=["prompt", "cache", "cache-half-steps", "cache-floor-256"])
def test_buckets_cover_their_length_monotonic_idempotent_and_capped(bucket):
    """Each bucket holds its length (until the cap), never exceeds max positions, grows with the
    length, and a bucket's own length maps to itself (so the shapes stay few)."""
    prev = 0
    for n in range(1, MAX + 1):
        b = bucket(n, MAX)
        assert n <= b <= MAX, f"length {n}: bucket {b} outside [{n}, {MAX}]"
        assert b >= prev, f"length {n}: bucket {b} < bucket {prev} of length {n - 1}"
        assert bucket(b, MAX) == b, f"length {n}: bucket {b} maps to {bucket(b, MAX)}"
        prev = b
    assert bucket(MAX, MAX) == MAX and bucket(32769, MAX) == MAX


@pytest.mark.parametrize("half_steps", [False, True])
def test_cache_rows_hold_the_prompt_and_the_budget(half_steps):
    """The runner asks for prompt + max_new_tokens rows: it gets at least that, and the floor."""
    for prompt in (1, 5, 16, 17, 100, 511, 4000, 30000):
        for budget in (1, 8, 111, 256, 1000, 8192):
            if prompt + budget > MAX:
                continue
            rows = cache_bucket(prompt + budget, MAX, half_steps=half_steps)
            assert rows >= max(prompt + budget, MIN_CACHE_ROWS), (prompt, budget, rows)
    assert cache_bucket(16 + 256, MAX, half_steps=True) == 384  # jax_impl.runner's example
    assert cache_bucket(16 + 256, MAX) == 512


def test_floors_and_the_cap_below_them():
    assert prompt_bucket(1, MAX) == MIN_PROMPT == 16 and cache_bucket(1, MAX) == MIN_CACHE_ROWS == 128
    assert cache_bucket(1, MAX, floor=256) == 256 and cache_bucket(300, MAX, floor=256) == 512
    assert cache_bucket(1, MAX, floor=256, half_steps=True) == 256  # 192 is under the floor
    # a model shorter than the floor: the cap wins (at most max_positions)
    assert prompt_bucket(3, 8) == 8 and cache_bucket(10, 64) == 64 and cache_bucket(10, 100, half_steps=True) == 100


# ----- a warm-up covers shorter prompts and budgets (both twins) -----------------------------------

WARM = (1, 100, 100)  # batch, prompt tokens, new tokens: prompt bucket 128, cache bucket 256
SHORTER = [(4, 10), (4, 100), (100, 10), (57, 33)]  # (prompt tokens, new tokens), each at most WARM's


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    import dataclasses

    from common.checkpoint import write_checkpoint
    from common.config import Qwen3Config, shrink

    cfg = dataclasses.replace(shrink(Qwen3Config.preset("Qwen3-0.6B"), layers=1, width=16, vocab=1024),
                              dtype="float32", max_position_embeddings=512)
    return write_checkpoint(tmp_path_factory.mktemp("warm") / "ckpt", cfg, seed=0)


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.8, top_k=20, top_p=0.9)],
                         ids=["greedy", "sampled"])
def test_jax_warmup_covers_every_shorter_prompt_and_budget(small_dir, sampling):
    """After load(warmup=[BxPxN]) a call of at most P prompt tokens and N new tokens compiles nothing
    (counted: XLA's backend compiles, in any thread)."""
    pytest.importorskip("jax")
    import jax

    import jax_impl

    runner = jax_impl.load(small_dir, dtype="float32", fused=False, compile_cache=False,
                           warmup=[dict(zip(("batch", "prompt_tokens", "new_tokens"), WARM), **sampling)])
    compiles = []

    def count(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        for prompt, new in SHORTER:
            runner.generate([[1] * prompt], new, **sampling)
            assert not compiles, f"a {prompt}-token prompt with {new} new tokens compiled after warm-up {WARM}"
            assert runner.last_stats["compile_s"] == 0.0
            assert len(list(runner.generate_stream([1] * prompt, new, **sampling))) >= 1
            assert not compiles, f"streaming {prompt} + {new} tokens compiled after warm-up {WARM}"
    finally:
        jax.monitoring.unregister_event_duration_listener(count)


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.8, top_k=20, top_p=0.9)],
                         ids=["greedy", "sampled"])
def test_torch_warmup_covers_every_shorter_prompt_and_budget(small_dir, sampling, monkeypatch):
    """After load(warmup=[BxPxN]) a call of at most P prompt tokens and N new tokens builds no new
    decode step (on CUDA: captures no CUDA graph) and keeps the KV cache."""
    pytest.importorskip("torch")
    import torch_impl
    from torch_impl import runner as runner_mod

    runner = torch_impl.load(small_dir, dtype="float32", fused=False,
                             warmup=[dict(zip(("batch", "prompt_tokens", "new_tokens"), WARM), **sampling)])
    built = []
    real = runner_mod.Decoder
    monkeypatch.setattr(runner_mod, "Decoder", lambda *a, **k: built.append(a) or real(*a, **k))
    cache = runner.kv
    for prompt, new in SHORTER:
        runner.generate([[1] * prompt], new, **sampling)
        assert len(list(runner.generate_stream([1] * prompt, new, **sampling))) >= 1
        assert not built and runner.kv is cache, f"{prompt} + {new} tokens built a decode step after warm-up {WARM}"
