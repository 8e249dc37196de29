"""Sampling semantics, specified once (both twins implement exactly this, in their framework).

Given one row of float32 logits:
- temperature == 0: greedy, the argmax (lowest id on ties). top_k/top_p are ignored.
- otherwise logits are divided by temperature, then
- top_k > 0 keeps the k largest logits (ties at the k-th value are kept too);
- top_p < 1 keeps the smallest prefix of tokens sorted by descending probability whose
  cumulative probability reaches top_p (the most likely token is always kept);
  top-k is applied before top-p, and top-p's probabilities are those after top-k;
- one token is drawn from the softmax of what is kept, from a generator seeded by `seed`
  (reproducible for a given seed within one framework; the streams differ across frameworks).

`allowed_mask` is the numpy statement of that rule; tests check that every token a twin samples
lies in it. `check_generate_args` is the one validation of generate()'s arguments.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


SEED_MAX = 2 ** 63 - 1  # seeds are 0 .. SEED_MAX: what jax's PRNG keys and torch.Generator both take


class GenerationArgsError(ValueError):
    """An argument of generate() out of its range."""


def allowed_mask(logits, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Boolean mask [..., vocab] of the tokens the sampler may emit."""
    z = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        return z == z.max(axis=-1, keepdims=True)
    z = z / temperature
    keep = np.ones_like(z, dtype=bool)
    if top_k > 0:
        kth = np.sort(z, axis=-1)[..., -min(top_k, z.shape[-1])][..., None]
        keep &= z >= kth
    if top_p < 1.0:
        zz = np.where(keep, z, -np.inf)
        p = np.exp(zz - zz.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        order = np.argsort(-p, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(p, order, axis=-1)
        before = np.cumsum(sorted_p, axis=-1) - sorted_p  # mass strictly before each token
        keep_sorted = before < top_p
        nucleus = np.zeros_like(keep)
        np.put_along_axis(nucleus, order, keep_sorted, axis=-1)
        keep &= nucleus
    return keep


def check_generate_args(prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float,
                        top_k: int, top_p: float, vocab_size: int, max_len: int | None = None,
                        seed: int | None = None) -> None:
    """Raise GenerationArgsError naming the argument that is out of range (seed: when given)."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise GenerationArgsError("prompts: expected a non-empty list of token-id lists")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationArgsError(f"prompts[{i}]: empty prompt")
        bad = [t for t in p if not 0 <= int(t) < vocab_size]
        if bad:
            raise GenerationArgsError(f"prompts[{i}]: token id {bad[0]} outside [0, {vocab_size})")
        if max_len is not None and len(p) + max_new_tokens > max_len:
            raise GenerationArgsError(f"prompts[{i}]: {len(p)} prompt tokens + max_new_tokens={max_new_tokens} "
                                      f"exceed the maximum length {max_len}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationArgsError(f"max_new_tokens={max_new_tokens!r}: expected an integer >= 1")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise GenerationArgsError(f"temperature={temperature!r}: expected a finite value >= 0")
    if not isinstance(top_k, int) or top_k < 0:
        raise GenerationArgsError(f"top_k={top_k!r}: expected an integer >= 0 (0 = off)")
    if not 0.0 < top_p <= 1.0:
        raise GenerationArgsError(f"top_p={top_p!r}: expected a value in (0, 1]")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                             or not 0 <= seed <= SEED_MAX):
        raise GenerationArgsError(f"seed={seed!r}: expected an integer in [0, 2**63 - 1]")


def sample_numpy(logits, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    """One token from one row of logits (the reference runner's sampler)."""
    z = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        return int(np.argmax(z))
    keep = allowed_mask(z, temperature, top_k, top_p)
    zz = np.where(keep, z / temperature, -np.inf)
    p = np.exp(zz - zz.max())
    p /= p.sum()
    return int(rng.choice(len(p), p=p))
