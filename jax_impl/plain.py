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
import numpy as np

from common import reference
from common import tiles as tiles_mod
from common.formats import QWeight
from jax_impl.arrays import dense, device_info, dtype_key, precision_for, weight_shape

F32 = jnp.float32


def rms_norm(x, weight, *, eps: float):
    """weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).astype(x.dtype)  (Hugging Face's cast order)."""
    x32 = x.astype(F32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def matmul_f32(x, w, *, kernel: str = "linear_residual", **shape):
    """x @ w.T with w in the [out, in] layout (or a quantized QWeight), accumulated and returned in
    float32. `kernel` (and `shape`'s extra fields, rmsnorm_qkv's head_dim) name the projection for
    common.tiles.lookup; the head is a linear_residual without residual.

    int8 weights enter the product as their integer values (exact in bf16) and the per-channel
    scale multiplies the float32 result: `dot(x, convert(q))` is the product XLA fuses the convert
    into, where a dequantized `q * scale` operand is formed in memory first (Qwen3-0.6B batch-32
    int8 decode ran at 62% of bf16's speed on an H100 that way). fp8's 128 x 128 block scales vary
    along the reduction, so they scale the activations instead (`_fp8_blocks`); the weight enters
    the product as its e4m3 values (Qwen3-0.6B batch-32 fp8 decode on an H100: 21,088 tok/s, against
    14,410 with a dequantized operand; bf16 21,598).

    A single token row (batch-1 decode) takes the form the lookup's `plain_form` names for this
    device (common.tile_rules.default_plain_form): "reduce", multiply-and-reduce in float32, where
    XLA's row-reduction emitter streams the weight faster than its GEMV and takes the producing
    RMSNorm into the same kernel (CUDA GPUs); "dot", the product every other token count takes
    (the CPU, where the reduction is the slow form).
    """
    reduce = x.ndim == 2 and x.shape[0] == 1 and one_token_form(kernel, x, w, **shape) == "reduce"
    scale = None
    if isinstance(w, QWeight) and w.fmt == "int8":
        w, scale = w.q, w.scale
    if reduce:
        out = jnp.sum(x.astype(F32)[:, None, :] * dense(w, F32).astype(F32)[None], axis=-1)
    elif x.ndim == 2 and isinstance(w, QWeight) and w.fmt == "fp8" and _whole_blocks(w):
        return _fp8_blocks(x, w)
    else:
        w = dense(w, x.dtype) if scale is None else w.astype(x.dtype)
        out = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), precision=precision_for(x.dtype),
                                  preferred_element_type=F32)
    return out if scale is None else out * scale


def one_token_form(kernel: str, x, w, **shape) -> str:
    """The lookup's plain_form ("reduce" | "dot") of projection `kernel` at one token of x's dtype
    on the weight w (a plain array or a QWeight: its format keys its own table rows)."""
    fmt = w.fmt if isinstance(w, QWeight) else None
    n, k = weight_shape(w)
    return tiles_mod.lookup(kernel, "jax", device_info(), dtype=dtype_key(x.dtype, fmt), m=1, n=n, k=k,
                            **shape).plain_form


def _whole_blocks(w: QWeight) -> bool:
    return all(d % b == 0 for d, b in zip(w.q.shape, w.format.scale_block))


def _fp8_blocks(x, w: QWeight):
    """x [M, K] @ dequantize(w).T in float32 for fp8 weights of whole 128 x 128 blocks: output block
    b is (x scaled per K-block by the scales of b's row of blocks, rounded to x.dtype) @ q[b].T, one
    batched product over the output blocks, the e4m3 values converted inside it."""
    m, k = x.shape
    nb, kb = w.scale.shape
    br, bc = w.format.scale_block
    xs = (x.astype(F32).reshape(m, 1, kb, bc) * w.scale[None, :, :, None]).astype(x.dtype)
    q = w.q.reshape(nb, br, k).astype(x.dtype)
    out = jax.lax.dot_general(xs.reshape(m, nb, k), q, (((2,), (2,)), ((1,), (0,))),
                              precision=precision_for(x.dtype), preferred_element_type=F32)  # [nb, m, 128]
    return out.transpose(1, 0, 2).reshape(m, nb * br)


def linear(x, w, *, kernel: str = "linear_residual", **shape):
    """x @ w.T (see matmul_f32), rounded to x.dtype."""
    return matmul_f32(x, w, kernel=kernel, **shape).astype(x.dtype)


def rope_table(max_positions: int, head_dim: int, theta: float):
    """cos_sin [max_positions, head_dim] float32: [:, :D/2] = cos(pos*inv_freq), [:, D/2:] = sin.

    common.reference's table (angles in float64, rounded once: torch_impl's values), built on the
    host and placed on the device: no program compiled for it."""
    return jnp.asarray(reference.rope_table(max_positions, head_dim, theta).astype(np.float32))


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


def rmsnorm_qkv(x, norm_w, w_qkv, q_norm_w, k_norm_w, cos_sin, k_cache, v_cache, meta, *,
                num_heads: int, num_kv_heads: int, eps: float, tiles=None):
    """Qwen3's pre-attention path: returns q [T, Hq, D] (RoPE at meta.positions) and the caches with
    k/v written at meta.slots."""
    del tiles
    t = x.shape[0]
    d = q_norm_w.shape[0]
    qkv = linear(rms_norm(x, norm_w, eps=eps), w_qkv, kernel="rmsnorm_qkv", head_dim=d)
    q_size, kv_size = num_heads * d, num_kv_heads * d
    q = qkv[:, :q_size].reshape(t, num_heads, d)
    k = qkv[:, q_size:q_size + kv_size].reshape(t, num_kv_heads, d)
    v = qkv[:, q_size + kv_size:].reshape(t, num_kv_heads, d)
    q = apply_rope(rms_norm(q, q_norm_w, eps=eps), cos_sin, meta.positions)
    k = apply_rope(rms_norm(k, k_norm_w, eps=eps), cos_sin, meta.positions)
    return q, write_cache(k_cache, k, meta.slots), write_cache(v_cache, v, meta.slots)


def mlp(x, norm_w, w_gate_up, w_down, residual, *, eps: float, tiles=None, down_tiles=None):
    """residual + down(silu(gate) * up) of RMSNorm(x) (residual None: no add); w_gate_up rows [gate; up]."""
    del tiles, down_tiles
    gu = linear(rms_norm(x, norm_w, eps=eps), w_gate_up, kernel="mlp_gate_up")
    inter = gu.shape[-1] // 2
    return linear_residual(jax.nn.silu(gu[..., :inter]) * gu[..., inter:], w_down, residual)


def linear_residual(x, w, residual, *, tiles=None):
    """residual + x @ w.T (residual None: x @ w.T)."""
    del tiles
    out = linear(x, w)
    return out if residual is None else residual + out


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


def _sequence_keys(k_cache, v_cache, block_tables, b: int, rows: int):
    """Each sequence's cache rows [B, S, Hkv, D]: block b (block_tables None: its first `rows`), or the
    blocks of its table in order."""
    if block_tables is None:
        return k_cache[:b, :rows], v_cache[:b, :rows]
    idx = jnp.maximum(block_tables, 0)
    return (k_cache[idx].reshape(b, -1, *k_cache.shape[2:]), v_cache[idx].reshape(b, -1, *v_cache.shape[2:]))


def decode_attention(q, k_cache, v_cache, meta, *, tiles=None):
    """One query per sequence over its first meta.context_lens[b] cached keys; q [B, Hq, D] -> [B, Hq, D].

    meta.block_tables None: block b holds sequence b, read in place with no gather.
    """
    del tiles
    b = q.shape[0]
    k, v = _sequence_keys(k_cache, v_cache, meta.block_tables, b, k_cache.shape[1])
    mask = jnp.arange(k.shape[1])[None, None, :] < meta.context_lens[:, None, None]
    return _softmax_attend(q[:, None], k, v, mask)[:, 0]


def prefill_attention(q, k_cache, v_cache, meta, *, tiles=None):
    """Variable-length causal attention: sequence b's new tokens q[cu_q[b]:cu_q[b+1]] [T, Hq, D] over
    its cu_k[b+1] - cu_k[b] cached keys (a prefix, then the new tokens). Returns [T, Hq, D]."""
    del tiles
    t = q.shape[0]
    b = meta.cu_seqlens_q.shape[0] - 1
    lq = max(1, meta.max_seqlen_q)
    n_q = meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]  # [B]
    n_k = meta.cu_seqlens_k[1:] - meta.cu_seqlens_k[:-1]
    i = jnp.arange(lq)
    rows = meta.cu_seqlens_q[:-1, None] + i[None, :]  # [B, Lq] token index of each query
    valid = i[None, :] < n_q[:, None]
    qs = q[jnp.where(valid, rows, 0)]  # [B, Lq, Hq, D]
    k, v = _sequence_keys(k_cache, v_cache, meta.block_tables, b, max(1, meta.max_seqlen_k))
    qpos = (n_k - n_q)[:, None] + i[None, :]  # [B, Lq]
    j = jnp.arange(k.shape[1])
    mask = (j[None, None, :] <= qpos[:, :, None]) & (j[None, None, :] < n_k[:, None, None]) & valid[:, :, None]
    o = _softmax_attend(qs, k, v, mask)
    return jnp.zeros_like(q).at[jnp.where(valid, rows, t)].set(o, mode="drop")
