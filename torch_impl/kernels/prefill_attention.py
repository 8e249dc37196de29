"""Variable-length causal prefill attention (flash-attention style, no flash-attn needed).

q [Tq, Hq, D] holds the new tokens of B sequences back to back (cu_seqlens_q [B + 1]); sequence b
has cu_seqlens_k[b + 1] - cu_seqlens_k[b] keys in all, its cached prefix first, so its new token
i sits at position len_k - len_q + i and sees keys 0 .. that position. Keys and values come
from one of three layouts (as nano-vllm's prefill finds them):
- contiguous: k, v [Tk, Hkv, D], sequence b's keys at rows cu_seqlens_k[b] ...;
- kv_slots [Tk]: k, v are the caches [num_blocks, block_size, Hkv, D] and key j of sequence b
  is at flat row kv_slots[cu_seqlens_k[b] + j] (a prefill without cached prefix: its slot_mapping);
- block_tables [B, max_blocks]: k, v are the caches, key j at block_tables[b, j // bs] * bs + j % bs.
A program handles `block_m` queries of one head; scale 1/sqrt(D), GQA, float32 softmax.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from common.tiles import PrefillTiles, next_pow2
from torch_impl.kernels import _jit
from torch_impl.kernels._common import (check, check_cache, check_device, check_float, check_index, check_rows,
                                        pdl_meta, precision)

NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": a fully masked tile never produces NaN


@triton.jit
def _prefill_attention_kernel(
    q_ptr,  # [Tq, HQ, D]
    k_ptr, v_ptr,  # rows of [*, HKV, D] (see the module doc)
    cuq_ptr, cuk_ptr,  # [B + 1]
    slots_ptr,  # [Tk] (KV_MODE 1)
    bt_ptr,  # [B, max_blocks] (KV_MODE 2)
    out_ptr,  # [Tq, HQ, D]
    num_rows, block_size, max_blocks,
    stride_qt, stride_qh, stride_kr, stride_kh, stride_bt, stride_ot, stride_oh,
    scale,
    G: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, KV_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
):
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
    q = tl.load(q_ptr + (q0 + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, D_P]
    m_i = tl.full([BLOCK_M], NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_P], tl.float32)
    # causal: this tile's last query sees keys up to len_k - len_q + pid_m * BM + BM - 1
    hi = tl.minimum(len_k, len_k - len_q + (pid_m + 1) * BLOCK_M)
    hi = tl.where(pid_m * BLOCK_M < len_q, hi, 0)
    for j0 in range(0, hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        j_ok = j < len_k
        if KV_MODE == 0:
            rows = (k0 + j).to(tl.int64)
        elif KV_MODE == 1:
            rows = tl.load(slots_ptr + k0 + j, mask=j_ok, other=-1).to(tl.int64)
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
        visible = j_ok[None, :] & (j[None, :] <= qpos[:, None])
        s = tl.where(visible, s, NEG)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(visible, tl.exp(s - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = _jit.dot(_jit.cast(p, v.dtype, PRECISION), v, acc * alpha[:, None], PRECISION)
        m_i = m_new
    _jit.release_next(PDL)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (q0 + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             _jit.cast(o, out_ptr.dtype.element_ty, PRECISION), mask=m_ok[:, None] & d_ok[None, :])


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, *, max_seqlen_q: int, block_tables: torch.Tensor | None = None,
                      kv_slots: torch.Tensor | None = None, tiles: PrefillTiles | None = None) -> torch.Tensor:
    """Causal attention of the new tokens q [Tq, Hq, D] -> [Tq, Hq, D]; layouts in the module doc.

    max_seqlen_q (an int, as nano-vllm's context carries it) sizes the grid; it must be at least the
    longest sequence's new-token count (the kernel cannot check that without a host sync).
    """
    op = "prefill_attention"
    check(q.dim() == 3, f"{op}: q has shape {list(q.shape)}, expected [Tq, num_heads, head_dim]")
    check(block_tables is None or kv_slots is None, f"{op}: pass block_tables or kv_slots, not both")
    tq, hq, d = q.shape
    hkv = k.shape[-2] if k.dim() >= 3 else 0
    check(hkv > 0 and hq % hkv == 0 and k.shape[-1] == d,
          f"{op}: k has shape {list(k.shape)}, expected [..., Hkv, {d}] with Hkv dividing {hq}")
    if block_tables is not None or kv_slots is not None:
        check_cache(op, "k", k, hkv, d)
        check_cache(op, "v", v, hkv, d)
    else:
        check(k.dim() == 3, f"{op}: k has shape {list(k.shape)}, expected [Tk, Hkv, D] (no block_tables/kv_slots)")
    check(k.shape == v.shape and k.stride() == v.stride(),
          f"{op}: k {list(k.shape)} and v {list(v.shape)} differ in shape or strides")
    nb = cu_seqlens_q.shape[0] - 1
    check(cu_seqlens_q.dim() == 1 and nb >= 0 and cu_seqlens_k.shape == cu_seqlens_q.shape,
          f"{op}: cu_seqlens_q {list(cu_seqlens_q.shape)} and cu_seqlens_k {list(cu_seqlens_k.shape)}: "
          f"expected [B + 1] each")
    check_index(op, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    if kv_slots is not None:
        check_index(op, kv_slots=kv_slots)
    if block_tables is not None:
        check(block_tables.dim() == 2 and block_tables.shape[0] == nb,
              f"{op}: block_tables has shape {list(block_tables.shape)}, expected [{nb}, max_blocks]")
        check_index(op, block_tables=block_tables)
    check(isinstance(max_seqlen_q, int) and max_seqlen_q >= 0,
          f"{op}: max_seqlen_q={max_seqlen_q!r}, expected an int >= 0")
    check_float(op, q=q, k=k, v=v)
    check_device(op, q=q, k=k, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    check_rows(op, q=q, k=k)
    tiles = tiles or PrefillTiles.default_for(max_seqlen_q, d)
    out = torch.empty((tq, hq, d), dtype=q.dtype, device=q.device)
    if tq == 0 or nb == 0 or max_seqlen_q == 0:
        return out
    mode = 2 if block_tables is not None else 1 if kv_slots is not None else 0
    bs = k.shape[1] if mode else 1
    num_rows = k.shape[0] * bs if mode else k.shape[0]
    stride_kr = k.stride(1) if mode else k.stride(0)
    bt = block_tables if block_tables is not None else cu_seqlens_q
    slots = kv_slots if kv_slots is not None else cu_seqlens_q
    grid = (triton.cdiv(max_seqlen_q, tiles.block_m), nb, hq)
    _prefill_attention_kernel[grid](
        q, k, v, cu_seqlens_q, cu_seqlens_k, slots, bt, out, num_rows, bs, bt.shape[-1] if mode == 2 else 0,
        q.stride(0), q.stride(1), stride_kr, k.stride(-2), bt.stride(0), out.stride(0), out.stride(1),
        1.0 / math.sqrt(d), G=hq // hkv, D=d, D_P=max(16, next_pow2(d)), KV_MODE=mode,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, PRECISION=precision(q.dtype),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, **pdl_meta(q.device))
    return out
