"""Decode attention: one query token per sequence over the paged KV cache, GQA, in Pallas (Triton).

Grid (B, Hkv, num_splits). A program takes all G = Hq / Hkv query heads of one kv head
(padded to 16 rows for the tensor-core dot) and runs an online softmax over block_kv cache
positions at a time, gathered through the block table (position p lives in row
block_tables[b, p // block_size] * block_size + p % block_size of the flattened cache). With
block_tables=None, sequence b owns block b (row b * block_size + p): its keys and values are read
as windows of consecutive rows whose start is affine in the loop index, not gathered - on the
H100 4.28 vs 4.38 us per call at 144 positions and 5.93 vs 6.10 at 272 (Qwen3-0.6B, batch 1).
With num_splits > 1 (flash-decoding, for few sequences x kv heads vs the GPU's SMs) each
program covers its share of the sequence's own context length, writes a normalized partial
output with its max and sum, and a small XLA reduction combines the splits.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from common.tiles import AttentionTiles
from jax_impl.kernels._jit import DOT_MIN_M, F32, dot, gather_index, load, store
from jax_impl.kernels._lib import check, check_float, check_int, check_shape, pallas_call, tiles_for

NEG = -1e30  # finite "minus infinity": no inf - inf in the online softmax


def _decode_attention_kernel(q_ref,    # [b, hq, d]
                             k_ref,    # [rows, hkv, d]  (flattened cache)
                             v_ref,    # [rows, hkv, d]
                             *refs,    # [bt_ref [b, max_blocks] int32 if paged], len_ref [b] int32,
                                       # o_ref (splits == 1: [b, hq, d]; else [b, splits, hq, d] f32),
                                       # splits > 1: m_ref, l_ref [b, splits, hq] f32
                             paged: bool, group: int, block_h: int, block_kv: int, block_size: int,
                             splits: int, scale: float):
    bt_ref, (len_ref, o_ref, *stat_refs) = (refs[0], refs[1:]) if paged else (None, refs)
    b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    d = q_ref.shape[-1]
    heads = pl.ds(h * group, block_h)
    hmask = jnp.arange(block_h) < group
    q = load(q_ref.at[b, heads, :], mask=hmask[:, None], other=0)  # [block_h, d]
    length = load(len_ref.at[b])
    chunk = pl.cdiv(pl.cdiv(length, splits), block_kv) * block_kv  # this split's share
    start = s * chunk
    end = jnp.minimum(start + chunk, length)

    def body(i, carry):
        acc, m_prev, l_prev = carry
        pos = start + i * block_kv + jnp.arange(block_kv)
        pmask = pos < end
        if paged:
            blk = load(bt_ref.at[b, pos // block_size], mask=pmask, other=0)
            r, c = gather_index(blk * block_size + pos % block_size, 0, d)
            window = (r, h, c)
        else:  # sequence b's own block: rows b * block_size + pos (pos < length <= block_size), affine in i
            window = (pl.ds(b * block_size + start + i * block_kv, block_kv), h, pl.ds(0, d))
        k = load(k_ref.at[window], mask=pmask[:, None], other=0)  # [block_kv, d]
        v = load(v_ref.at[window], mask=pmask[:, None], other=0)
        sc = dot(q, k, ((1,), (1,))) * scale
        sc = jnp.where(pmask[None, :], sc, NEG)  # [block_h, block_kv]
        m_new = jnp.maximum(m_prev, jnp.max(sc, axis=1))
        p = jnp.where(pmask[None, :], jnp.exp(sc - m_new[:, None]), 0.0)
        corr = jnp.exp(m_prev - m_new)
        acc = acc * corr[:, None] + dot(p.astype(v.dtype), v, ((1,), (0,)))
        return acc, m_new, l_prev * corr + jnp.sum(p, axis=1)

    init = (jnp.zeros((block_h, d), F32), jnp.full((block_h,), NEG, F32), jnp.zeros((block_h,), F32))
    acc, m_i, l_i = lax.fori_loop(0, pl.cdiv(jnp.maximum(end - start, 0), block_kv), body, init)
    out = acc / jnp.maximum(l_i, 1e-30)[:, None]
    if splits == 1:
        store(o_ref.at[b, heads, :], out.astype(o_ref.dtype), mask=hmask[:, None])
    else:
        m_ref, l_ref = stat_refs
        store(o_ref.at[b, s, heads, :], out, mask=hmask[:, None])
        store(m_ref.at[b, s, heads], m_i, mask=hmask)
        store(l_ref.at[b, s, heads], l_i, mask=hmask)


def decode_attention(q, k_cache, v_cache, meta, *, tiles: AttentionTiles | None = None,
                     interpret: bool | None = None):
    """softmax(q k^T / sqrt(D)) v over each sequence's first meta.context_lens[b] cached positions.

    q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; meta.block_tables [B, max_blocks]
    int32, or None: one block per sequence in batch order (block b holds sequence b, read in place
    with no table, as jax_impl.model lays the cache out); meta.context_lens [B] int32 (>= 1, <= the
    blocks' capacity). Returns [B, Hq, D] in q.dtype.
    """
    block_tables, context_lens = meta.block_tables, meta.context_lens
    check(q.ndim == 3, f"decode_attention: q: expected [B, Hq, D], got shape {q.shape}")
    bsz, hq, d = q.shape
    check(k_cache.ndim == 4 and k_cache.shape[3] == d,
            f"decode_attention: k_cache: expected [num_blocks, block_size, Hkv, {d}], got {k_cache.shape}")
    num_blocks, block_size, hkv, _ = k_cache.shape
    check_shape("decode_attention: v_cache", v_cache, k_cache.shape)
    check(hq % hkv == 0, f"decode_attention: q heads {hq} must be a multiple of kv heads {hkv}")
    check(d & (d - 1) == 0, f"decode_attention: head_dim={d}: expected a power of two")
    paged = block_tables is not None
    if paged:
        check(block_tables.ndim == 2 and block_tables.shape[0] == bsz,
                f"decode_attention: block_tables: expected [{bsz}, max_blocks], got {block_tables.shape}")
        check_int("decode_attention: block_tables", block_tables)
    else:
        check(num_blocks >= bsz, f"decode_attention: block_tables=None needs one cache block per sequence: "
                                   f"{num_blocks} blocks for {bsz} sequences")
    check_shape("decode_attention: context_lens", context_lens, (bsz,))
    check_int("decode_attention: context_lens", context_lens)
    check_float("decode_attention: q", q)
    check_float("decode_attention: k_cache", k_cache, q.dtype)
    check_float("decode_attention: v_cache", v_cache, q.dtype)
    group = hq // hkv
    block_h = max(DOT_MIN_M, 1 << (group - 1).bit_length())
    blocks = block_tables.shape[1] if paged else 1
    t = tiles_for("decode_attention", "decode_attention", tiles, AttentionTiles, q.dtype, batch=bsz,
                    num_kv_heads=hkv, max_context=blocks * block_size, one_block=blocks == 1)
    kernel = functools.partial(_decode_attention_kernel, paged=paged, group=group, block_h=block_h,
                               block_kv=t.block_kv,
                               block_size=block_size, splits=t.num_splits, scale=1.0 / math.sqrt(d))
    if t.num_splits == 1:
        out_shape = jax.ShapeDtypeStruct((bsz, hq, d), q.dtype)
    else:
        out_shape = (jax.ShapeDtypeStruct((bsz, t.num_splits, hq, d), F32),
                     jax.ShapeDtypeStruct((bsz, t.num_splits, hq), F32),
                     jax.ShapeDtypeStruct((bsz, t.num_splits, hq), F32))
    res = pallas_call(kernel, name="decode_attention", grid=(bsz, hkv, t.num_splits), out_shape=out_shape,
                        num_warps=t.num_warps, num_stages=t.num_stages, interpret=interpret)(
        q, k_cache.reshape(-1, hkv, d), v_cache.reshape(-1, hkv, d), *([block_tables] if paged else []),
        context_lens)
    if t.num_splits == 1:
        return res
    o, m, l = res  # combine the splits: weights l * exp(m - max m); empty splits have l = 0
    # The barrier follows jax's own Pallas decode attention, which found that without it XLA can
    # produce invalid values in this reduction after compilation (b/389925439).
    m_max = lax.optimization_barrier(jnp.max(m, axis=1, keepdims=True))
    w = l * jnp.exp(m - m_max)  # [B, S, Hq]
    # (a sequence with no keys - context_lens 0, batch padding - has w = 0 everywhere: zeros, not 0/0)
    out = jnp.sum(o * w[..., None], axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1e-30)[..., None]
    return out.astype(q.dtype)
