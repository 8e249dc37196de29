"""common/sampling.py's semantics in jnp, traced inside the compiled decode loop.

`top_k` and the greedy / top-p switches are static (they pick the compiled program);
temperature and top_p are traced scalars.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(logits, key, temperature, top_p, *, greedy: bool, top_k: int, use_top_p: bool):
    """logits [B, V] float32 -> token ids [B] int32."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    z = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(z, min(top_k, z.shape[-1]))[0][:, -1:]
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
