"""common/sampling.py's semantics in jnp, traced inside the compiled decode loop.

The greedy / top-p switches and `k_cap` (top-k's static bound: 0 = off, else a power of two >= the
k asked) pick the compiled program; temperature, top_p and top_k itself are traced scalars, so a new
value within the same bounds compiles nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def k_cap_for(top_k: int, vocab: int) -> int:
    """The static bound of a top-k of `top_k` (0 = off): the next power of two, at least 64 (one
    program for every usual top-k)."""
    if top_k <= 0:
        return 0
    return min(vocab, max(64, 1 << (int(top_k) - 1).bit_length()))


def sample(logits, key, temperature, top_p, top_k, *, greedy: bool, k_cap: int, use_top_p: bool):
    """logits [B, V] float32 -> token ids [B] int32; top_k <= k_cap (traced)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    z = logits / temperature
    if k_cap > 0:
        top = jax.lax.top_k(z, k_cap)[0]  # [B, k_cap] descending
        kth = jnp.take(top, jnp.clip(top_k, 1, k_cap) - 1, axis=-1)[:, None]
        z = jnp.where(z >= kth, z, -jnp.inf)
    if use_top_p:
        order = jnp.argsort(-z, axis=-1, stable=True)  # descending probability, ties by index
        sorted_z = jnp.take_along_axis(z, order, axis=-1)
        p = jax.nn.softmax(sorted_z, axis=-1)
        before = jnp.cumsum(p, axis=-1) - p  # probability mass strictly before each token
        keep_sorted = before < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(z.shape[0])[:, None], order].set(keep_sorted)
        z = jnp.where(keep, z, -jnp.inf)
    return jax.random.categorical(key, z, axis=-1).astype(jnp.int32)
