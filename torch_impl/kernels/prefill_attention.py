"""Variable-length causal prefill attention (flash-attention style, no flash-attn needed).

q [Tq, Hq, D] holds the new tokens of B sequences back to back (meta.cu_seqlens_q [B + 1]);
sequence b has cu_seqlens_k[b + 1] - cu_seqlens_k[b] keys in all, its cached prefix first, so its
new token i sits at position len_k - len_q + i and sees keys 0 .. that position. Keys and values
are read from the caches [num_blocks, block_size, Hkv, D] (rmsnorm_qkv wrote this step's rows):
key j of sequence b at block_tables[b, j // bs] * bs + j % bs, or with meta.block_tables None at
row j of block b (one block per sequence). A program handles `block_m` queries of one head;
scale 1/sqrt(D), GQA, float32 softmax. Its keys come in two loops: the blocks of `block_n` keys
that every query of the tile sees (below the diagonal: no causal mask, the bulk of a long prompt),
then the blocks that cross the diagonal up to the tile's last visible key (masked). The
twin of jax_impl/kernels/prefill_attention.py.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from common.tiles import PrefillTiles, next_pow2
from torch_impl.kernels import _jit
from torch_impl.kernels._lib import (check, check_cache, check_device, check_float, check_index, check_rows,
                                     pdl_meta, precision, tiles_for)

NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": a fully masked tile never produces NaN


@triton.jit
def _attend_block(q, acc, m_i, l_i, j0, qpos, b, kvh, offs_d, d_ok, k_ptr, v_ptr, bt_ptr, len_k, num_rows,
                  block_size, max_blocks, stride_kr, stride_kh, stride_bt, scale,
                  PAGED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                  CAUSAL: tl.constexpr):
    """One online-softmax step over keys j0 .. j0 + BLOCK_N - 1. CAUSAL False: a block every query
    of the tile sees whole, no mask on the scores (a key whose table entry points outside the
    cache is still never read: it counts as a zero key, where the masked step drops it)."""
    j = j0 + tl.arange(0, BLOCK_N)
    j_ok = j < len_k
    if not PAGED:  # block b, rows 0 ..
        rows = tl.where(j < block_size, b.to(tl.int64) * block_size + j, -1)
    else:
        blk = tl.load(bt_ptr + b * stride_bt + j // block_size,
                      mask=j_ok & (j // block_size < max_blocks), other=-1).to(tl.int64)
        rows = tl.where(blk >= 0, blk * block_size + j % block_size, -1)
    j_ok = j_ok & (rows >= 0) & (rows < num_rows)  # never read outside k / v
    kv_off = rows[:, None] * stride_kr + kvh * stride_kh + offs_d[None, :]
    kv_mask = j_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)  # [BN, D_P]
    v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
    s = _jit.dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), PRECISION) * scale  # [BM, BN]
    if CAUSAL:
        visible = j_ok[None, :] & (j[None, :] <= qpos[:, None])
        s = tl.where(visible, s, NEG)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    if CAUSAL:
        p = tl.where(visible, p, 0.0)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = _jit.dot(_jit.cast(p, v.dtype, PRECISION), v, acc * alpha[:, None], PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_attention_kernel(
    q_ptr,  # [Tq, HQ, D]
    k_ptr, v_ptr,  # rows of [*, HKV, D] (see the module doc)
    cuq_ptr, cuk_ptr,  # [B + 1]
    bt_ptr,  # [B, max_blocks] (PAGED)
    out_ptr,  # [Tq, HQ, D]
    num_rows, block_size, max_blocks,
    stride_qt, stride_qh, stride_kr, stride_kh, stride_bt, stride_ot, stride_oh,
    scale,
    G: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, PAGED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    _jit.release_first(PDL)  # PDL 2: the next kernel launches and streams its weights meanwhile
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    kvh = h // G
    _jit.wait_prior(PDL)
    q0 = tl.load(cuq_ptr + b)
    len_q = tl.load(cuq_ptr + b + 1) - q0
    k0 = tl.load(cuk_ptr + b)
    len_k = tl.load(cuk_ptr + b + 1) - k0
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the sequence
    offs_d = tl.arange(0, D_P)
    m_ok = offs_m < len_q
    d_ok = offs_d < D
    qpos = len_k - len_q + offs_m  # absolute positions
    tok = (q0 + offs_m).to(tl.int64)  # token rows; 64-bit: rows * stride can pass 2^31
    q = tl.load(q_ptr + tok[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, D_P]
    m_i = tl.full([BLOCK_M], NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_P], tl.float32)
    # causal: this tile's last query sees keys up to len_k - len_q + pid_m * BM + BM - 1, its first
    # (and so every query of the tile) keys 0 .. len_k - len_q + pid_m * BM: whole blocks of those
    # need no mask
    hi = tl.minimum(len_k, len_k - len_q + (pid_m + 1) * BLOCK_M)
    hi = tl.where(pid_m * BLOCK_M < len_q, hi, 0)
    full = tl.minimum(tl.maximum(len_k - len_q + pid_m * BLOCK_M + 1, 0) // BLOCK_N * BLOCK_N, hi)
    for j0 in range(0, full, BLOCK_N):
        acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, j0, qpos, b, kvh, offs_d, d_ok, k_ptr, v_ptr, bt_ptr, len_k,
                                      num_rows, block_size, max_blocks, stride_kr, stride_kh, stride_bt, scale,
                                      PAGED, BLOCK_M, BLOCK_N, PRECISION, False)
    for j0 in range(full, hi, BLOCK_N):
        acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, j0, qpos, b, kvh, offs_d, d_ok, k_ptr, v_ptr, bt_ptr, len_k,
                                      num_rows, block_size, max_blocks, stride_kr, stride_kh, stride_bt, scale,
                                      PAGED, BLOCK_M, BLOCK_N, PRECISION, True)
    _jit.release_after(PDL)  # PDL 1: the loads are done
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             _jit.cast(o, out_ptr.dtype.element_ty, PRECISION), mask=m_ok[:, None] & d_ok[None, :])


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, *,
                      tiles: PrefillTiles | None = None) -> torch.Tensor:
    """Causal attention of the new tokens q [Tq, Hq, D] -> [Tq, Hq, D]; layout in the module doc.

    meta.max_seqlen_q (an int) sizes the grid; it must be at least the longest sequence's new-token
    count (the kernel cannot check that without a host sync).
    """
    op = "prefill_attention"
    cu_seqlens_q, cu_seqlens_k, block_tables = meta.cu_seqlens_q, meta.cu_seqlens_k, meta.block_tables
    max_seqlen_q = meta.max_seqlen_q
    check(q.dim() == 3, f"{op}: q has shape {list(q.shape)}, expected [Tq, num_heads, head_dim]")
    tq, hq, d = q.shape
    check(k_cache.dim() == 4, f"{op}: k_cache has shape {list(k_cache.shape)}, expected [blocks, bs, Hkv, {d}]")
    hkv = k_cache.shape[2]
    check(hkv > 0 and hq % hkv == 0, f"{op}: q has {hq} heads, not a multiple of the cache's {hkv} kv heads")
    check_cache(op, "k_cache", k_cache, hkv, d)
    check_cache(op, "v_cache", v_cache, hkv, d)
    check(k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride(),
          f"{op}: k_cache {list(k_cache.shape)} and v_cache {list(v_cache.shape)} differ in shape or strides")
    nb = cu_seqlens_q.shape[0] - 1
    check(cu_seqlens_q.dim() == 1 and nb >= 0 and cu_seqlens_k.shape == cu_seqlens_q.shape,
          f"{op}: cu_seqlens_q {list(cu_seqlens_q.shape)} and cu_seqlens_k {list(cu_seqlens_k.shape)}: "
          f"expected [B + 1] each")
    check_index(op, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    paged = block_tables is not None
    if paged:
        check(block_tables.dim() == 2 and block_tables.shape[0] == nb,
              f"{op}: block_tables has shape {list(block_tables.shape)}, expected [{nb}, max_blocks]")
        check_index(op, block_tables=block_tables)
    else:
        check(k_cache.shape[0] >= nb, f"{op}: block_tables None needs one cache block per sequence: "
                                      f"{k_cache.shape[0]} blocks for {nb} sequences")
    check(isinstance(max_seqlen_q, int) and max_seqlen_q >= 0,
          f"{op}: meta.max_seqlen_q={max_seqlen_q!r}, expected an int >= 0")
    check_float(op, q=q, k_cache=k_cache, v_cache=v_cache)
    check_device(op, q=q, k_cache=k_cache, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    check_rows(op, q=q)
    tiles = tiles_for(op, op, tiles, PrefillTiles, q.device, q.dtype, max_seqlen_q=max_seqlen_q, head_dim=d)
    out = torch.empty((tq, hq, d), dtype=q.dtype, device=q.device)
    if tq == 0 or nb == 0 or max_seqlen_q == 0:
        return out
    bs = k_cache.shape[1]
    bt = block_tables if paged else cu_seqlens_q.view(1, -1)  # never read unpaged
    grid = (triton.cdiv(max_seqlen_q, tiles.block_m), nb, hq)
    _prefill_attention_kernel[grid](
        q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, bt, out, k_cache.shape[0] * bs, bs, bt.shape[-1],
        q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2), bt.stride(0), out.stride(0), out.stride(1),
        1.0 / math.sqrt(d), G=hq // hkv, D=d, D_P=max(16, next_pow2(d)), PAGED=paged,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, PRECISION=precision(q.dtype),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, **pdl_meta(q.device))
    return out
