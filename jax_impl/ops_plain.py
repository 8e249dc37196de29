"""The plain XLA path: each op of the twin kernel API written in jnp.

Same names, argument order and semantics as jax_impl/kernels/*.py (see common/reference.py for
the maths). These are what the model runs when the fused kernels are off, the baselines the
kernel tests and benchmarks compare against.
Rounding follows transformers in the activation dtype: RMSNorm normalizes in float32 and casts
back before the weight multiply; matmuls accumulate in float32 and round to the activation dtype;
q/k-norm and RoPE are computed in float32 and rounded once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def precision_for(dtype):
    """Full float32 products for float32 operands: XLA on GPUs defaults to TF32 for them (a float32
    model would drift ~1e-3 from transformers'); bf16 operands use the tensor cores as they are."""
    return jax.lax.Precision.HIGHEST if dtype == F32 else None


def rms_norm(x, weight, eps: float):
    """weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).astype(x.dtype)  (Hugging Face's cast order)."""
    x32 = x.astype(F32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def matmul_f32(x, w):
    """x @ w.T with w in the [out, in] layout, accumulated and returned in float32.

    A single token row (batch-1 decode) is written as multiply-and-reduce: XLA's row-reduction
    emitter streams the weight faster than its GEMV on the H100 (Qwen3-8B batch-1 decode 171 tok/s
    against 155 with the dot; the 0.6B lm_head 100.2 us against 105.8) and takes the producing
    RMSNorm into the same kernel.
    """
    if x.ndim == 2 and x.shape[0] == 1:
        return jnp.sum(x.astype(F32)[:, None, :] * w.astype(F32)[None], axis=-1)
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), precision=precision_for(x.dtype),
                               preferred_element_type=F32)


def linear(x, w):
    """x @ w.T (see matmul_f32), rounded to x.dtype."""
    return matmul_f32(x, w).astype(x.dtype)


def rope_table(max_positions: int, head_dim: int, theta: float):
    """cos_sin [max_positions, head_dim] float32: [:, :D/2] = cos(pos*inv_freq), [:, D/2:] = sin."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=F32) / head_dim))
    ang = jnp.arange(max_positions, dtype=F32)[:, None] * inv_freq[None, :]
    return jnp.concatenate([jnp.cos(ang), jnp.sin(ang)], axis=-1)


def apply_rope(x, cos_sin, positions):
    """Rotate-half RoPE in float32 on x [T, heads, D] at positions [T]; returns x.dtype."""
    half = x.shape[-1] // 2
    cs = cos_sin[positions][:, None, :]  # [T, 1, D]
    cos, sin = cs[..., :half], cs[..., half:]
    x32 = x.astype(F32)
    x1, x2 = x32[..., :half], x32[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def write_cache(cache, values, slots):
    """cache [num_blocks, block_size, Hkv, D] with values [T, Hkv, D] written at slots (-1 = skip)."""
    flat = cache.reshape(-1, *cache.shape[2:])
    safe = jnp.where(slots < 0, flat.shape[0], slots)  # out of range -> dropped
    return flat.at[safe].set(values.astype(cache.dtype), mode="drop").reshape(cache.shape)


def rmsnorm_qkv(x, norm_w, w_qkv, q_norm_w, k_norm_w, cos_sin, positions, slots, k_cache, v_cache, *,
                num_heads: int, num_kv_heads: int, eps: float, tiles=None):
    """Qwen3's pre-attention path: returns q [T, Hq, D] and the caches with k/v written at slots."""
    del tiles
    t = x.shape[0]
    d = q_norm_w.shape[0]
    qkv = linear(rms_norm(x, norm_w, eps), w_qkv)
    q_size, kv_size = num_heads * d, num_kv_heads * d
    q = qkv[:, :q_size].reshape(t, num_heads, d)
    k = qkv[:, q_size:q_size + kv_size].reshape(t, num_kv_heads, d)
    v = qkv[:, q_size + kv_size:].reshape(t, num_kv_heads, d)
    q = apply_rope(rms_norm(q, q_norm_w, eps), cos_sin, positions)
    k = apply_rope(rms_norm(k, k_norm_w, eps), cos_sin, positions)
    return q, write_cache(k_cache, k, slots), write_cache(v_cache, v, slots)


def mlp(x, norm_w, w_gate_up, w_down, *, eps: float, tiles=None):
    """x + down(silu(gate) * up) of RMSNorm(x); w_gate_up rows [gate; up]."""
    del tiles
    gu = linear(rms_norm(x, norm_w, eps), w_gate_up)
    inter = gu.shape[-1] // 2
    act = jax.nn.silu(gu[..., :inter]) * gu[..., inter:]
    return x + linear(act, w_down)


def attn_out(attn, w_o, residual, *, tiles=None):
    """residual + attn @ w_o.T."""
    del tiles
    return residual + linear(attn, w_o)


def _softmax_attend(q, k, v, mask):
    """q [B, Tq, Hq, D], k/v [B, S, Hkv, D], mask [B, Tq, S] -> [B, Tq, Hq, D] (GQA, f32 softmax)."""
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, tq, hkv, hq // hkv, d)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, precision=precision_for(q.dtype),
                   preferred_element_type=F32) * (1.0 / d ** 0.5)
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, precision=precision_for(v.dtype),
                   preferred_element_type=F32)
    return o.reshape(b, tq, hq, d).astype(q.dtype)


def decode_attention(q, k_cache, v_cache, block_tables, context_lens, *, tiles=None):
    """One query per sequence over the paged cache; q [B, Hq, D] -> [B, Hq, D].

    block_tables None means one block per sequence in batch order (block b holds sequence b):
    the cache is read in place, with no gather.
    """
    del tiles
    b = q.shape[0]
    if block_tables is None:
        k, v = k_cache, v_cache  # [B, block_size, Hkv, D]
    else:
        k = k_cache[block_tables].reshape(b, -1, *k_cache.shape[2:])  # [B, max_blocks*block_size, Hkv, D]
        v = v_cache[block_tables].reshape(b, -1, *v_cache.shape[2:])
    mask = jnp.arange(k.shape[1])[None, None, :] < context_lens[:, None, None]
    return _softmax_attend(q[:, None], k, v, mask)[:, 0]


def prefill_attention(q, k, v, lengths):
    """Causal attention within each right-padded sequence from position 0.

    q [B, L, Hq, D], k/v [B, L, Hkv, D], lengths [B]; rows past a sequence's length are don't-care.
    """
    l = q.shape[1]
    causal = jnp.arange(l)[:, None] >= jnp.arange(l)[None, :]
    valid = jnp.arange(l)[None, None, :] < lengths[:, None, None]
    return _softmax_attend(q, k, v, causal[None] & valid)
