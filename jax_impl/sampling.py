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
    z = filtered(logits, temperature, top_p, top_k, k_cap=k_cap, use_top_p=use_top_p)
    return jax.random.categorical(key, z, axis=-1).astype(jnp.int32)


def filtered(logits, temperature, top_p, top_k, *, k_cap: int, use_top_p: bool):
    """logits / temperature with every token top-k and top-p drop set to -inf (common.sampling).

    With top-k on, top-p runs on top-k's k_cap candidates: lax.top_k returns them in the order the
    nucleus needs (descending, the lower id first on ties), so no sort of the vocabulary is needed.
    Only when more tokens than k_cap tie at or above the k-th value does it sort the vocabulary."""
    z = logits / temperature
    if k_cap > 0:
        top, ids = jax.lax.top_k(z, k_cap)  # [B, k_cap] descending, the lower id first on ties
        kth = jnp.take(top, jnp.clip(top_k, 1, k_cap) - 1, axis=-1)[:, None]
        kept = z >= kth
        z = jnp.where(kept, z, -jnp.inf)
        if use_top_p:
            fits = jnp.all(jnp.sum(kept, axis=-1) <= k_cap)  # every kept token is a candidate
            z = jax.lax.cond(fits, lambda z: _nucleus_of(z, jnp.where(top >= kth, top, -jnp.inf), ids, top_p),
                             lambda z: nucleus(z, top_p), z)
    elif use_top_p:
        z = nucleus(z, top_p)
    return z


def nucleus(z, top_p):
    """z [B, V] with what top-p drops set to -inf: the vocabulary sorted by descending probability,
    ties by index."""
    order = jnp.argsort(-z, axis=-1, stable=True)
    return _nucleus_of(z, jnp.take_along_axis(z, order, axis=-1), order, top_p)


def _nucleus_of(z, sorted_z, ids, top_p):
    """top-p given the leading tokens in nucleus order (sorted_z [B, n] at vocabulary ids [B, n]):
    every token outside them has probability 0 and is dropped."""
    p = jax.nn.softmax(sorted_z, axis=-1)
    before = jnp.cumsum(p, axis=-1) - p  # probability mass strictly before each token
    keep = jnp.zeros(z.shape, bool).at[jnp.arange(z.shape[0])[:, None], ids].set(before < top_p)
    return jnp.where(keep, z, -jnp.inf)
