"""The plain torch path: each op of the twin kernel API written with torch ops.

Same names, argument order and semantics as torch_impl/kernels/*.py (the maths is in
common/reference.py). This is what the model runs when the fused kernels are off, and the
baseline of the kernel tests and of the speedups the benchmarks report.

Rounding follows transformers in the activation dtype: RMSNorm normalizes in float32 and casts
back before the weight multiply; matmuls accumulate in float32 and round to the activation
dtype; q/k-norm (Hugging Face's cast order) and RoPE are computed in float32 and rounded once;
residual adds happen in the activation dtype (the projection is rounded, then added).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.formats import QWeight

F32 = torch.float32


def dense(w, dtype: torch.dtype) -> torch.Tensor:
    """The weight [out, in] in `dtype`: a tensor as it is, a common.formats.QWeight dequantized as
    common.formats.WeightFormat.dequantize (per-row scales, or one per block)."""
    if not isinstance(w, QWeight):
        return w
    q = w.q.to(F32)
    if w.format.per_row:
        return (q * w.scale[:, None]).to(dtype)
    br, bc = w.format.scale_block
    s = w.scale.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:q.shape[0], :q.shape[1]]
    return (q * s).to(dtype)


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """x @ w.T in x's dtype, w a tensor or a QWeight (dequantized first: the plain path's weight-only
    semantics, as transformers runs a quantized checkpoint without one-byte matmuls)."""
    return F.linear(x, dense(w, x.dtype))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float) -> torch.Tensor:
    """weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype)  (Hugging Face's cast order)."""
    x32 = x.to(F32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight.to(x.dtype) * normed.to(x.dtype)


def rope_table(max_positions: int, head_dim: int, theta: float, device=None) -> torch.Tensor:
    """cos_sin [max_positions, head_dim] float32: [:, :D/2] = cos(pos*inv_freq), [:, D/2:] = sin.

    Angles are formed in float64 and rounded once (exact for every position up to 40960).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1).to(F32).to(device)


def apply_rope(x: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in float32 on x [T, heads, D] (float32) at positions [T]."""
    half = x.shape[-1] // 2
    cs = cos_sin[positions.long()][:, None, :]
    cos, sin = cs[..., :half], cs[..., half:]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def write_cache(cache: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> None:
    """cache [num_blocks, block_size, Hkv, D] gets values [T, Hkv, D] at flat rows `slots` (-1 = skip).

    On CUDA this is the small Triton store kernel (graph-safe, as nano-vllm's own store);
    elsewhere masked indexing.
    """
    if cache.numel() == 0:
        return
    if cache.is_cuda:
        from torch_impl.kernels.store_kv import store_kv  # noqa: PLC0415

        store_kv(values, cache, slots)
        return
    flat = cache.view(-1, *cache.shape[2:])
    ok = (slots >= 0) & (slots < flat.shape[0])
    flat[slots[ok].long()] = values[ok].to(cache.dtype)


def rmsnorm_qkv(x, norm_w, w_qkv, q_norm_w, k_norm_w, cos_sin, k_cache, v_cache, meta, *,
                num_heads: int, num_kv_heads: int, eps: float, tiles=None):
    """Qwen3's pre-attention path: q [T, Hq, D] (normed, roped at meta.positions) and the caches with
    k/v written at meta.slots."""
    del tiles
    t, d = x.shape[0], q_norm_w.shape[0]
    qkv = linear(rms_norm(x, norm_w, eps=eps), w_qkv)
    q_size, kv_size = num_heads * d, num_kv_heads * d
    q = qkv[:, :q_size].reshape(t, num_heads, d)
    k = qkv[:, q_size:q_size + kv_size].reshape(t, num_kv_heads, d)
    v = qkv[:, q_size + kv_size:].reshape(t, num_kv_heads, d)
    q = apply_rope(rms_norm(q, q_norm_w, eps=eps).to(F32), cos_sin, meta.positions).to(x.dtype)
    k = apply_rope(rms_norm(k, k_norm_w, eps=eps).to(F32), cos_sin, meta.positions).to(x.dtype)
    write_cache(k_cache, k, meta.slots)
    write_cache(v_cache, v, meta.slots)
    return q, k_cache, v_cache


def mlp(x, norm_w, w_gate_up, w_down, residual, *, eps: float, tiles=None, down_tiles=None):
    """residual + down(silu(gate) * up) of RMSNorm(x) (residual None: no add); w_gate_up rows [gate; up]."""
    del tiles, down_tiles
    gu = linear(rms_norm(x, norm_w, eps=eps), w_gate_up)
    inter = gu.shape[-1] // 2
    return linear_residual(F.silu(gu[:, :inter]) * gu[:, inter:], w_down, residual)


def linear_residual(x, w, residual, *, tiles=None):
    """residual + x @ w.T (the projection rounded to the activation dtype, then added; None: no add)."""
    del tiles
    out = linear(x, w)
    return out if residual is None else residual + out


def _sdpa(q, k, v, mask):
    """q [B, Hq, Tq, D], k/v [B, Hkv, S, D], mask [B, 1, Tq, S] bool -> [B, Hq, Tq, D] (GQA)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def _attend(q, k, v, mask):
    """q [Tq, Hq, D], k/v [S, Hkv, D], mask [Tq, S] bool -> [Tq, Hq, D]."""
    o = _sdpa(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask[None, None])
    return o[0].transpose(0, 1)


def _blocks(meta, b: int, k_cache) -> torch.Tensor:
    """The block ids of every sequence [B, max_blocks] (block_tables None: block b for sequence b)."""
    if meta.block_tables is not None:
        return meta.block_tables.long()
    return torch.arange(b, device=k_cache.device)[:, None]


def decode_attention(q, k_cache, v_cache, meta, *, tiles=None):
    """One query per sequence over its cache; q [B, Hq, D] -> [B, Hq, D].

    Gathers every block of the sequence's table (padding -1 reads a real block, masked out) and masks
    by meta.context_lens; rows with context_lens 0 (graph padding) attend to row 0 and are don't-care.
    """
    del tiles
    b, hq, d = q.shape
    bs = k_cache.shape[1]
    idx = _blocks(meta, b, k_cache).clamp(min=0)
    k = k_cache[idx].reshape(b, -1, *k_cache.shape[2:])  # [B, S, Hkv, D]
    v = v_cache[idx].reshape(b, -1, *v_cache.shape[2:])
    n = torch.arange(idx.shape[1] * bs, device=q.device)
    mask = n[None, :] < meta.context_lens.long().clamp(min=1)[:, None]  # [B, S]
    o = _sdpa(q[:, :, None], k.transpose(1, 2), v.transpose(1, 2), mask[:, None, None, :])
    return o[:, :, 0]


def prefill_attention(q, k_cache, v_cache, meta, *, tiles=None):
    """Variable-length causal attention over the caches; see torch_impl/kernels/prefill_attention.py."""
    del tiles
    if q.is_cuda and torch.cuda.is_current_stream_capturing():  # before .tolist() would break the capture
        raise RuntimeError("the plain prefill attention reads the sequence lengths on the host: "
                           "it cannot run inside a CUDA graph")
    out = torch.empty_like(q)
    cq, ck = meta.cu_seqlens_q.tolist(), meta.cu_seqlens_k.tolist()
    blocks = _blocks(meta, len(cq) - 1, k_cache)
    bs = k_cache.shape[1]
    flat_k, flat_v = k_cache.reshape(-1, *k_cache.shape[2:]), v_cache.reshape(-1, *v_cache.shape[2:])
    for b in range(len(cq) - 1):
        lq, lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if lq == 0:
            continue
        j = torch.arange(lk, device=q.device)
        rows = blocks[b][j // bs] * bs + j % bs
        qpos = torch.arange(lk - lq, lk, device=q.device)
        mask = j[None, :] <= qpos[:, None]
        out[cq[b]:cq[b + 1]] = _attend(q[cq[b]:cq[b + 1]], flat_k[rows], flat_v[rows], mask)
    return out
