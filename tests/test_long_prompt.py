"""Greedy tokens after long prompts: jax_impl, torch_impl and transformers (SDPA) agree.

GPU (marked gpu): a real-shape config - Qwen3-0.6B's layers (hidden 1024, 16 / 8 heads, head_dim
128, intermediate 3072), 2 of them, 40,960 positions, random weights with peaked logits written as
a Hugging Face checkpoint - and prompts of 8k and 32k tokens. float32: the three runners' tokens
are identical. bfloat16: each twin against transformers in bfloat16; a divergence is printed with
the float32 model's logit margin at that step (top-1 minus top-2, and over the largest logit) and
fails only where the float32 margin is no near-tie (above NEAR_TIE): bf16 rounding can flip a
near-tie, a wrong kernel flips clear choices.

CPU: the same test at a tiny shape (hidden 128, 2 / 1 heads of 128, one layer), a prompt of 53
tokens in 16 x 16 prefill attention tiles (whole key blocks below the diagonal, then the diagonal
block), both twins' kernels in their interpreters, float32.

Weights: common.checkpoint's default scale (std 0.02) with realistic norm weights - greedy tokens
that vary from step to step (a peaked head repeats the last token).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from common.checkpoint import write_checkpoint
from common.config import PRESETS, shrink

pytest.importorskip("transformers")

NEW_TOKENS = 8  # GPU; CPU: CPU_NEW_TOKENS
CPU_NEW_TOKENS = 2
NEAR_TIE = 0.05  # bf16: a divergence at a step whose float32 margin is below this share of the top logit
GPU_PROMPTS = (8192, 32768)
CPU_PROMPTS = (53,)


def _config(gpu: bool):
    base = PRESETS["Qwen3-0.6B"]
    if gpu:  # the real layer shape, 2 layers, every position of the preset (40,960)
        cfg = dataclasses.replace(base, num_hidden_layers=2)
        assert cfg.max_position_embeddings >= max(GPU_PROMPTS) + NEW_TOKENS
        return cfg
    return shrink(base, layers=1, width=8, vocab=256)


def _prompt(n: int, vocab: int) -> list[int]:
    return np.random.default_rng(n).integers(1, vocab, size=n).tolist()


def _runners(path, dtype: str, gpu: bool) -> dict:
    import jax_impl
    import torch_impl
    from common.hf_runner import load as load_hf

    fused = "auto" if gpu else True  # CPU: every kernel in its interpreter
    return {"jax": jax_impl.load(path, dtype=dtype, fused=fused),
            "torch": torch_impl.load(path, dtype=dtype, fused=fused, device="cuda" if gpu else "cpu"),
            "transformers": load_hf(path, dtype=dtype, device="cuda" if gpu else "cpu")}


def _generate(runners: dict, prompt: list[int], new_tokens: int = NEW_TOKENS) -> dict[str, list[int]]:
    out = {}
    for name, r in runners.items():
        t0 = time.perf_counter()
        out[name] = r.generate([prompt], new_tokens)[0]
        print(f"  {name}: {len(prompt)}-token prompt, {new_tokens} tokens in {time.perf_counter() - t0:.1f} s: "
              f"{out[name]}")
    return out


def _margin(hf_runner, ids: list[int]) -> tuple[float, float]:
    """transformers' last-token logits after `ids` (last token only: 32k x vocab would not fit):
    (top-1 minus top-2, that over the largest absolute logit)."""
    import torch

    with torch.inference_mode():
        x = torch.tensor([ids], device=hf_runner.model.device)
        logits = hf_runner.model(input_ids=x, logits_to_keep=1).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    gap = float(top[0] - top[1])
    return gap, gap / float(logits.abs().max())


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{"cpu" | "gpu": checkpoint dir}, written on first use."""
    root, made = tmp_path_factory.mktemp("long_prompt"), {}

    def get(kind: str):
        if kind not in made:
            made[kind] = write_checkpoint(root / kind, _config(kind == "gpu"), seed=3, norm_scale="realistic")
        return made[kind]
    return get


def _same_tokens(checkpoints, gpu: bool) -> None:
    kind = "gpu" if gpu else "cpu"
    runners = _runners(checkpoints(kind), "float32", gpu)
    new_tokens = NEW_TOKENS if gpu else CPU_NEW_TOKENS
    for n in GPU_PROMPTS if gpu else CPU_PROMPTS:
        prompt = _prompt(n, _config(gpu).vocab_size)
        got = _generate(runners, prompt, new_tokens)
        want = got["transformers"]
        assert len(want) == new_tokens, want
        for name in ("jax", "torch"):
            i = _first_divergence(got[name], want)
            assert i is None, (f"{name} float32, {n}-token prompt: first divergence at new token {i} "
                               f"({got[name][i:i + 1]} vs transformers' {want[i:i + 1]}; transformers' margin "
                               f"there {_margin(runners['transformers'], prompt + want[:i])})")


@pytest.fixture
def small_prefill_tiles(monkeypatch):
    """Prefill attention in 16 x 16 tiles through the one lookup (its default rule): the rule's 64-row
    blocks would need prompts four times as long, in the interpreters."""
    from common import tile_rules, tiles

    rule = tile_rules.default_tiles

    def small(kernel, *args, **kwargs):
        return tiles.PrefillTiles(16, 16) if kernel == "prefill_attention" else rule(kernel, *args, **kwargs)

    monkeypatch.setattr(tile_rules, "default_tiles", small)
    tiles.clear_cache()
    yield
    tiles.clear_cache()


def test_long_prompt_greedy_tokens_agree_cpu(checkpoints, small_prefill_tiles):
    """The tiny shape on CPU: both twins' kernels in their interpreters."""
    from conftest import HAS_GPU

    if HAS_GPU:
        pytest.skip("the GPU runs test_long_prompt_greedy_tokens_agree at the real shape")
    _same_tokens(checkpoints, gpu=False)


@pytest.fixture
def float32_sdpa_without_gqa(monkeypatch):
    """transformers' float32 SDPA on CUDA through its repeat_kv path: with enable_gqa (its choice
    without a mask) float32 leaves only torch's math backend, whose 32k x 32k scores per head do
    not fit; repeated kv heads keep the memory-efficient kernel (the same attention)."""
    from transformers.integrations import sdpa_attention

    monkeypatch.setattr(sdpa_attention, "use_gqa_in_sdpa", lambda *args, **kwargs: False)


@pytest.mark.gpu
def test_long_prompt_greedy_tokens_agree(checkpoints, float32_sdpa_without_gqa):
    """float32 at the real shape: 8k and 32k prompts, identical greedy tokens in all three."""
    _same_tokens(checkpoints, gpu=True)


@pytest.mark.gpu
def test_long_prompt_bf16_divergences_are_near_ties(checkpoints, float32_sdpa_without_gqa):
    """bfloat16 at the real shape: every divergence from transformers (bf16) printed with the float32
    margin at that step; a divergence where the float32 choice is clear fails. (bf16 takes the
    same repeat_kv path as the float32 model beside it.)"""
    from common.hf_runner import load as load_hf

    path = checkpoints("gpu")
    runners = _runners(path, "bfloat16", gpu=True)
    exact = load_hf(path, dtype="float32", device="cuda")
    bad = []
    for n in GPU_PROMPTS:
        prompt = _prompt(n, _config(True).vocab_size)
        got = _generate(runners, prompt)
        want = got["transformers"]
        for name in ("jax", "torch"):
            i = _first_divergence(got[name], want)
            if i is None:
                print(f"bf16 {name} vs transformers, {n}-token prompt: identical ({NEW_TOKENS} tokens)")
                continue
            gap, rel = _margin(exact, prompt + want[:i])
            print(f"bf16 {name} vs transformers, {n}-token prompt: first divergence at new token {i}: "
                  f"{got[name][i:i + 1]} vs {want[i:i + 1]}; float32 margin {gap:.4g} ({rel:.2%} of the top logit)")
            if rel > NEAR_TIE:
                bad.append(f"{name} at {n} tokens, new token {i}: float32 margin {rel:.2%} of the top logit")
    assert not bad, "bf16 divergences where the float32 choice is clear: " + "; ".join(bad)
