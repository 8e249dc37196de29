"""The numerical truth: plain numpy reference of every Qwen3 op and of the full forward pass.

Every kernel test and benchmark imports its reference from here. The ops of common.ops take the
ops' arguments (numpy arrays, the meta an AttentionMeta of numpy arrays; the caches returned are
new arrays), so `OPS[name].reference(*args, **kwargs)` is the truth of any call. Computation is in float64
by default (pass `dtype=np.float32` to any op for a float32 reference). Weights use the
Hugging Face orientation [out_features, in_features]; the packed forms are the ones
`common.weights` builds: w_qkv = [q; k; v] rows, w_gate_up = [gate; up] rows.

Semantics follow transformers' Qwen3 (see shared QWEN3 notes): RMSNorm normalizes in float
and casts back to the input dtype before the weight multiply (a no-op in float64), q/k-norm
are per-head RMSNorms before neox-style RoPE, causal GQA softmax with scale 1/sqrt(head_dim),
residual adds in the activation dtype.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from common.config import Qwen3Config
from common.formats import QWeight, dequantize

F64 = np.float64


def _f(x, dtype):
    return np.asarray(x, dtype=dtype)


def rms_norm(x, weight, *, eps: float, dtype=F64):
    """weight * x / sqrt(mean(x^2) + eps) over the last axis."""
    x = _f(x, dtype)
    var = np.mean(x * x, axis=-1, keepdims=True)
    return _f(weight, dtype) * (x / np.sqrt(var + dtype(eps)))


def rope_cos_sin(positions, head_dim: int, theta: float, *, dtype=F64):
    """cos, sin of shape [*positions.shape, head_dim] (neox layout: the half table repeated)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=F64) / head_dim))
    ang = np.asarray(positions, dtype=F64)[..., None] * inv_freq
    ang = np.concatenate([ang, ang], axis=-1)
    return np.cos(ang).astype(dtype), np.sin(ang).astype(dtype)


def rope_table(max_positions: int, head_dim: int, theta: float, *, dtype=F64):
    """The ops' cos_sin table [max_positions, head_dim]: [:, :D/2] = cos(pos * inv_freq), [:, D/2:] = sin."""
    cos, sin = rope_cos_sin(np.arange(max_positions), head_dim, theta, dtype=dtype)
    half = head_dim // 2
    return np.concatenate([cos[:, :half], sin[:, :half]], axis=-1)


def apply_rope(x, cos, sin, *, dtype=F64):
    """Rotate-half RoPE. x: [T, heads, head_dim]; cos, sin: [T, head_dim]."""
    x = _f(x, dtype)
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def qkv(x, norm_w, w_qkv, q_norm_w, k_norm_w, cos, sin, *, num_heads: int, num_kv_heads: int, eps: float,
        dtype=F64):
    """Qwen3's pre-attention path for tokens x [T, hidden] with RoPE's cos, sin [T, head_dim].

    Returns q [T, num_heads, head_dim], k and v [T, num_kv_heads, head_dim]
    (q and k after q/k-norm and RoPE; v as projected).
    """
    t, head_dim = x.shape[0], np.shape(q_norm_w)[-1]
    h = rms_norm(x, norm_w, eps=eps, dtype=dtype)
    packed = h @ dequantized(w_qkv, dtype).T
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q = packed[:, :q_size].reshape(t, num_heads, head_dim)
    k = packed[:, q_size:q_size + kv_size].reshape(t, num_kv_heads, head_dim)
    v = packed[:, q_size + kv_size:].reshape(t, num_kv_heads, head_dim)
    q = rms_norm(q, q_norm_w, eps=eps, dtype=dtype)
    k = rms_norm(k, k_norm_w, eps=eps, dtype=dtype)
    return apply_rope(q, cos, sin, dtype=dtype), apply_rope(k, cos, sin, dtype=dtype), v


def write_cache(cache, values, slots, *, dtype=F64):
    """A copy of cache [num_blocks, block_size, Hkv, D] with values [T, Hkv, D] at the flat rows
    slots [T] (-1: not written)."""
    out = _f(cache, dtype).copy()
    flat = out.reshape(-1, *out.shape[2:])
    slots = np.asarray(slots)
    flat[slots[slots >= 0]] = _f(values, dtype)[slots >= 0]
    return out


def rmsnorm_qkv(x, norm_w, w_qkv, q_norm_w, k_norm_w, cos_sin, k_cache, v_cache, meta, *, num_heads: int,
                num_kv_heads: int, eps: float, dtype=F64):
    """The op (common.ops): q [T, num_heads, D] after q-norm and RoPE at meta.positions (cos_sin:
    `rope_table`'s layout), and copies of the caches with k (k-norm, RoPE) and v at meta.slots."""
    cs = _f(cos_sin, dtype)[np.asarray(meta.positions)]
    half = cs.shape[-1] // 2
    cos = np.concatenate([cs[:, :half], cs[:, :half]], axis=-1)
    sin = np.concatenate([cs[:, half:], cs[:, half:]], axis=-1)
    q, k, v = qkv(x, norm_w, w_qkv, q_norm_w, k_norm_w, cos, sin, num_heads=num_heads, num_kv_heads=num_kv_heads,
                  eps=eps, dtype=dtype)
    return q, write_cache(k_cache, k, meta.slots, dtype=dtype), write_cache(v_cache, v, meta.slots, dtype=dtype)


def attention(q, k, v, q_positions, *, dtype=F64):
    """Causal GQA attention of one sequence.

    q [T, Hq, D] at absolute positions q_positions [T]; k, v [S, Hkv, D] hold positions 0..S-1.
    Key j is visible to query i iff j <= q_positions[i]. Returns [T, Hq, D].
    """
    q, k, v = _f(q, dtype), _f(k, dtype), _f(v, dtype)
    t, hq, d = q.shape
    s, hkv, _ = k.shape
    group = hq // hkv
    k = np.repeat(k, group, axis=1)  # [S, Hq, D]
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(dtype(d))
    visible = np.arange(s)[None, :] <= np.asarray(q_positions)[:, None]  # [T, S]
    scores = np.where(visible[None], scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p = p / p.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, v)


def sequence_rows(cache, block_tables, b: int, n: int) -> np.ndarray:
    """The first n cache rows [n, Hkv, D] of sequence b: through its block table, or (block_tables
    None) block b itself (the ops' AttentionMeta)."""
    cache = np.asarray(cache)
    bs = cache.shape[1]
    j = np.arange(n)
    blocks = np.full(n, b) if block_tables is None else np.asarray(block_tables)[b, j // bs]
    return cache.reshape(-1, *cache.shape[2:])[blocks * bs + j % bs]


def decode_attention(q, k_cache, v_cache, meta, *, dtype=F64):
    """The op (common.ops): one query token per sequence over its KV cache.

    q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; sequence b attends to its first
    meta.context_lens[b] (>= 1) cache rows (its own new key included), found through
    meta.block_tables (None: block b). Returns [B, Hq, D].
    """
    out = []
    for b, n in enumerate(np.asarray(meta.context_lens)):
        k, v = (sequence_rows(c, meta.block_tables, b, n) for c in (k_cache, v_cache))
        out.append(attention(q[b:b + 1], k, v, [n - 1], dtype=dtype)[0])
    return np.stack(out)


def prefill_attention(q, k_cache, v_cache, meta, *, dtype=F64):
    """The op (common.ops): variable-length causal attention. Sequence b's new tokens
    q[cu_q[b]:cu_q[b+1]] (meta.cu_seqlens_q; the last of its keys) attend over its cu_k[b+1] - cu_k[b]
    keys (meta.cu_seqlens_k: a cached prefix, then the new tokens), its first cache rows (through
    meta.block_tables; None: block b).

    q [T, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]. Returns [T, Hq, D].
    """
    cq, ck = np.asarray(meta.cu_seqlens_q), np.asarray(meta.cu_seqlens_k)
    out = np.zeros(np.shape(q), dtype=dtype)
    for b in range(len(cq) - 1):
        nq, nk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if nq == 0:
            continue
        k, v = (sequence_rows(c, meta.block_tables, b, nk) for c in (k_cache, v_cache))
        out[cq[b]:cq[b + 1]] = attention(q[cq[b]:cq[b + 1]], k, v, np.arange(nk - nq, nk), dtype=dtype)
    return out


def silu(x):
    return x / (1.0 + np.exp(-x))


def swiglu(x, w_gate_up, w_down, *, dtype=F64):
    """down(silu(gate(x)) * up(x)); w_gate_up [2*I, hidden] = [gate; up], w_down [hidden, I]."""
    gu = _f(x, dtype) @ dequantized(w_gate_up, dtype).T
    inter = gu.shape[-1] // 2
    return (silu(gu[..., :inter]) * gu[..., inter:]) @ dequantized(w_down, dtype).T


def mlp(x, norm_w, w_gate_up, w_down, residual, *, eps: float, dtype=F64):
    """The op (common.ops): residual + MLP(RMSNorm(x)) (residual None: the MLP alone); in a decoder
    layer residual is x."""
    out = swiglu(rms_norm(x, norm_w, eps=eps, dtype=dtype), w_gate_up, w_down, dtype=dtype)
    return out if residual is None else _f(residual, dtype) + out


def dequantized(w, dtype=F64) -> np.ndarray:
    """The float weight a projection stands for: an array as it is, a common.formats.QWeight as
    q * scale (the format's WeightFormat.dequantize)."""
    if isinstance(w, QWeight):
        return dequantize(np.asarray(w.q), np.asarray(w.scale), w.fmt, dtype)
    return _f(w, dtype)


def linear_residual(x, w, residual, *, dtype=F64):
    """The op (common.ops): residual + x @ w.T (residual None: the product alone); x [T, K], w [N, K]
    (o_proj: K = Hq*D)."""
    out = _f(x, dtype) @ dequantized(w, dtype).T
    return out if residual is None else _f(residual, dtype) + out


# ----- whole model ----------------------------------------------------------------------------

def layer_weights(weights: Mapping[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    """The packed weights of layer i from Hugging Face names (common.weights' plan)."""
    from common.weights import pack_layer

    return pack_layer(weights, i, lambda parts: np.concatenate(parts, axis=0))


def decoder_layer(x, lw: Mapping[str, np.ndarray], positions, cfg: Qwen3Config, *, dtype=F64):
    """One decoder layer over one whole sequence x [T, hidden] at positions 0..T-1."""
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, dtype=dtype)
    q, k, v = qkv(x, lw["input_norm"], lw["w_qkv"], lw["q_norm"], lw["k_norm"], cos, sin,
                  num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads, eps=cfg.rms_norm_eps,
                  dtype=dtype)
    a = attention(q, k, v, positions, dtype=dtype).reshape(x.shape[0], -1)
    x = linear_residual(a, lw["w_o"], x, dtype=dtype)
    return mlp(x, lw["post_norm"], lw["w_gate_up"], lw["w_down"], x, eps=cfg.rms_norm_eps, dtype=dtype)


def lm_head_weight(weights: Mapping[str, np.ndarray], cfg: Qwen3Config):
    """The head: lm_head.weight when present (untied, or a tied model's quantized head), else the embedding."""
    return weights.get("lm_head.weight", weights["model.embed_tokens.weight"]) if cfg.tie_word_embeddings \
        else weights["lm_head.weight"]


def forward(weights: Mapping[str, np.ndarray], cfg: Qwen3Config, token_ids, *, dtype=F64):
    """Token ids [B, T] -> logits [B, T, vocab], a full causal forward from position 0."""
    ids = np.asarray(token_ids)
    if ids.ndim != 2:
        raise ValueError(f"token_ids: expected shape [batch, seq], got {ids.shape}")
    embed = _f(weights["model.embed_tokens.weight"], dtype)
    head = _f(lm_head_weight(weights, cfg), dtype)
    layers = [{k: _f(v, dtype) for k, v in layer_weights(weights, i).items()}
              for i in range(cfg.num_hidden_layers)]
    final_norm = weights["model.norm.weight"]
    positions = np.arange(ids.shape[1])
    out = []
    for row in ids:
        x = embed[row]
        for lw in layers:
            x = decoder_layer(x, lw, positions, cfg, dtype=dtype)
        out.append(rms_norm(x, final_norm, eps=cfg.rms_norm_eps, dtype=dtype) @ head.T)
    return np.stack(out)
