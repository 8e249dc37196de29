"""Qwen3's whole pre-attention path in one launch: RMSNorm(x) @ w_qkv.T, per-head q/k RMSNorm,
rotate-half RoPE, and the KV-cache write of this step's k and v at `slots`.

Each program owns `block_n` rows of one head's first half and the matching rows of its second
half (RoPE pairs d with d + D/2), for `block_m` tokens:
- v heads: the rows are rounded and written straight into v_cache;
- q/k heads: q/k-norm needs the whole head. When block_n covers the half head (prefill tiles)
  the program finishes the head itself: one launch. When a head is split over several programs
  (decode tiles: more programs stream W), each parks its float32 rows in a scratch buffer and a
  second, small launch normalizes, ropes and stores each head (the split variant, as jax_impl's;
  measured faster on an H100 than one launch whose last program per head finished it).
Rounding: RMSNorm(x) rounded to x.dtype before the matmul (Hugging Face's order), float32
accumulation, q/k-norm and RoPE in float32, q and k rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from common import formats
from common.tiles import MatmulTiles, next_pow2
from torch_impl.kernels import _jit
from torch_impl.kernels._lib import (check, check_cache, check_device, check_float, check_index,
                                     check_rows, check_shape, matmul_meta, pdl_meta, precision, split_buffers,
                                     split_weight, tiles_for)


@triton.jit
def _head_inputs(head, qn_ptr, kn_ptr, cs_ptr, pos, stride_cs, offs_d, d_ok, HQ: tl.constexpr, HALF: tl.constexpr):
    """What q/k-norm and RoPE of one head read besides the head itself: its norm weight's halves
    (q_norm for q heads, k_norm for k heads) [1, W] and cos, sin [BM, W] at the tokens' positions.
    None of it is written by an earlier kernel, so it can be loaded before waiting for one."""
    nw_ptr = tl.where(head < HQ, qn_ptr, kn_ptr)
    w_lo = tl.load(nw_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    w_hi = tl.load(nw_ptr + HALF + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    cs = cs_ptr + pos[:, None] * stride_cs + offs_d[None, :]
    cos = tl.load(cs, mask=d_ok[None, :], other=0.0)
    sin = tl.load(cs + HALF, mask=d_ok[None, :], other=0.0)
    return w_lo, w_hi, cos, sin


@triton.jit
def _finish_head(lo, hi, head, offs_m, m_ok, slot, s_ok, offs_d, d_ok, w_lo, w_hi, cos, sin, q_ptr, kc_ptr,
                 stride_qm, stride_qh, stride_cslot, stride_ch, eps, HQ: tl.constexpr, D: tl.constexpr,
                 HALF: tl.constexpr, PRECISION: tl.constexpr):
    """q/k-norm (float32) then rotate-half RoPE of one head (lo, hi [BM, W] = columns d, d + D/2),
    stored as q or into k_cache at the tokens' slots."""
    rstd = tl.rsqrt((tl.sum(lo * lo, axis=1) + tl.sum(hi * hi, axis=1)) / D + eps)[:, None]
    n_lo = lo * rstd * w_lo
    n_hi = hi * rstd * w_hi
    o_lo = n_lo * cos - n_hi * sin
    o_hi = n_hi * cos + n_lo * sin
    if head < HQ:
        dst = q_ptr + offs_m[:, None] * stride_qm + head * stride_qh + offs_d[None, :]
        mask = m_ok[:, None] & d_ok[None, :]
    else:
        dst = kc_ptr + slot[:, None] * stride_cslot + (head - HQ) * stride_ch + offs_d[None, :]
        mask = s_ok[:, None] & d_ok[None, :]
    tl.store(dst, _jit.cast(o_lo, dst.dtype.element_ty, PRECISION), mask=mask)
    tl.store(dst + HALF, _jit.cast(o_hi, dst.dtype.element_ty, PRECISION), mask=mask)


@triton.jit(do_not_specialize=_jit.TOKEN_COUNT)
def _rmsnorm_qkv_kernel(
    x_ptr,  # [M, K]
    nw_ptr,  # [K]
    w_ptr,  # [(HQ + 2 HKV) D, K]
    s_ptr,  # w's scales when quantized (QUANT 1: [rows]; 2: [rows/128, K/128])
    qn_ptr, kn_ptr,  # [D]
    cs_ptr,  # [max_pos, D] float32 (cos | sin)
    pos_ptr, slot_ptr,  # [M]
    q_ptr,  # [M, HQ, D]
    kc_ptr, vc_ptr,  # [num_slots, HKV, D] (flattened blocks)
    part_ptr,  # [M, HQ + HKV, D] float32 scratch (split heads only)
    ws_ptr, cnt_ptr,  # split_k (SPLIT > 1): float32 partial sums [SPLIT, M, (HQ + 2 HKV) D], arrival counters
    M, K, num_slots, max_pos,
    stride_xm, stride_wn, stride_sn, stride_cs, stride_qm, stride_qh, stride_cslot, stride_ch, stride_pm,
    stride_ws, stride_wm,
    eps,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILES: tl.constexpr,
    EVEN_K: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
    SWAP: tl.constexpr, ONE_SHOT: tl.constexpr, QUANT: tl.constexpr, SPLIT: tl.constexpr,
):
    _jit.release_first(PDL)  # PDL 2: the next kernel launches and streams its weights meanwhile
    pid = tl.program_id(0)
    pid_m = tl.program_id(1)
    head = pid // TILES
    offs_c = (pid % TILES) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] columns within the half head
    c_ok = offs_c < HALF
    rows_lo = head * D + offs_c
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BM]; 64-bit: rows * stride can pass 2^31
    m_ok = offs_m < M

    pw_lo, pw_hi, pnw, psc_lo, psc_hi = _jit.request(w_ptr, s_ptr, nw_ptr, rows_lo, rows_lo + HALF, c_ok, stride_wn,
                                                     stride_sn, K, True, True, BLOCK_N, BLOCK_K, EVEN_K, USE_DOT,
                                                     QUANT)  # the first chunk, before the wait
    _jit.wait_prior(PDL)
    # positions and slots with x, one round trip after the wait
    pos = tl.load(pos_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
    pos = tl.minimum(tl.maximum(pos, 0), max_pos - 1)  # never read outside the RoPE table
    slot = tl.load(slot_ptr + offs_m, mask=m_ok, other=-1).to(tl.int64)
    acc_lo, acc_hi = _jit.project(x_ptr, nw_ptr, w_ptr, rows_lo, rows_lo + HALF, c_ok, offs_m, m_ok, stride_xm,
                                  stride_wn, K, eps, pw_lo, pw_hi, pnw, psc_lo, psc_hi, True, True, BLOCK_M, BLOCK_N,
                                  BLOCK_K, EVEN_K, USE_DOT, PRECISION, SWAP, ONE_SHOT, s_ptr, stride_sn, QUANT, SPLIT)
    _jit.release_after(PDL)  # PDL 1: the loads are done
    if SPLIT > 1:  # the tile's last program to finish stores it
        acc_lo, acc_hi, m_ok = _jit.split_sum(acc_lo, acc_hi, True, ws_ptr, cnt_ptr, rows_lo, rows_lo + HALF, c_ok,
                                              offs_m, m_ok, stride_ws, stride_wm, SPLIT)
    s_ok = m_ok & (slot >= 0) & (slot < num_slots)  # -1 (and anything out of range) is not written
    if head >= HQ + HKV:  # v: no norm, no RoPE
        v_dst = vc_ptr + slot[:, None] * stride_cslot + (head - HQ - HKV) * stride_ch + offs_c[None, :]
        v_mask = s_ok[:, None] & c_ok[None, :]
        tl.store(v_dst, _jit.cast(acc_lo, v_dst.dtype.element_ty, PRECISION), mask=v_mask)
        tl.store(v_dst + HALF, _jit.cast(acc_hi, v_dst.dtype.element_ty, PRECISION), mask=v_mask)
    elif TILES == 1:
        w_lo, w_hi, cos, sin = _head_inputs(head, qn_ptr, kn_ptr, cs_ptr, pos, stride_cs, offs_c, c_ok, HQ, HALF)
        _finish_head(acc_lo, acc_hi, head, offs_m, m_ok, slot, s_ok, offs_c, c_ok, w_lo, w_hi, cos, sin, q_ptr,
                     kc_ptr, stride_qm, stride_qh, stride_cslot, stride_ch, eps, HQ, D, HALF, PRECISION)
    else:  # head split over programs: park the float32 rows for the epilogue kernel
        part = part_ptr + offs_m[:, None] * stride_pm + head * D
        p_mask = m_ok[:, None] & c_ok[None, :]
        tl.store(part + offs_c[None, :], acc_lo, mask=p_mask)
        tl.store(part + HALF + offs_c[None, :], acc_hi, mask=p_mask)


@triton.jit(do_not_specialize=_jit.TOKEN_COUNT)
def _qk_epilogue_kernel(
    part_ptr,  # [M, HQ + HKV, D] float32: the q and k heads' projections
    qn_ptr, kn_ptr, cs_ptr, pos_ptr, slot_ptr, q_ptr, kc_ptr,
    M, num_slots, max_pos,
    stride_pm, stride_cs, stride_qm, stride_qh, stride_cslot, stride_ch,
    eps,
    HQ: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    """Split variant, second launch: q/k-norm, RoPE and the store of one head for BLOCK_M tokens."""
    _jit.release_first(PDL)  # PDL 2: the next kernel launches and streams its weights meanwhile
    head = tl.program_id(0)
    offs_m = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_ok = offs_m < M
    offs_d = tl.arange(0, HALF_P)
    d_ok = offs_d < HALF
    f_mask = m_ok[:, None] & d_ok[None, :]
    part = part_ptr + offs_m[:, None] * stride_pm + head * D + offs_d[None, :]
    # positions, slots, norm weights and RoPE table: written by no kernel of this step (the model's
    # decode step advances positions and slots before its first layer), loaded before the wait
    pos = tl.load(pos_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
    pos = tl.minimum(tl.maximum(pos, 0), max_pos - 1)  # never read outside the RoPE table
    slot = tl.load(slot_ptr + offs_m, mask=m_ok, other=-1).to(tl.int64)
    s_ok = m_ok & (slot >= 0) & (slot < num_slots)  # -1 (and anything out of range) is not written
    w_lo, w_hi, cos, sin = _head_inputs(head, qn_ptr, kn_ptr, cs_ptr, pos, stride_cs, offs_d, d_ok, HQ, HALF)
    _jit.wait_prior(PDL)  # the projection's rows
    lo = tl.load(part, mask=f_mask, other=0.0)
    hi = tl.load(part + HALF, mask=f_mask, other=0.0)
    _jit.release_after(PDL)  # PDL 1: the loads are done
    _finish_head(lo, hi, head, offs_m, m_ok, slot, s_ok, offs_d, d_ok, w_lo, w_hi, cos, sin, q_ptr, kc_ptr,
                 stride_qm, stride_qh, stride_cslot, stride_ch, eps, HQ, D, HALF, PRECISION)


def rmsnorm_qkv(x, norm_w, w_qkv, q_norm_w, k_norm_w, cos_sin, k_cache, v_cache, meta, *,
                num_heads: int, num_kv_heads: int, eps: float, tiles: MatmulTiles | None = None):
    """q [T, Hq, D] (q-normed, roped at meta.positions, x.dtype) and the caches with k (normed, roped)
    and v written in place at meta.slots (-1 = skip); returns (q, k_cache, v_cache). Shapes: see
    common.ops (x [T, hidden], w_qkv [(Hq + 2 Hkv) D, hidden], caches [blocks, bs, Hkv, D])."""
    op = "rmsnorm_qkv"
    positions, slots = meta.positions, meta.slots
    check(x.dim() == 2, f"{op}: x has shape {list(x.shape)}, expected [T, hidden]")
    check_float(op, x=x)
    w_qkv, scale, stride_sn, fmt = split_weight(op, "w_qkv", w_qkv, x.dtype)
    m, k = x.shape
    d = q_norm_w.shape[0] if q_norm_w.dim() == 1 else -1
    check(d > 0 and d % 2 == 0, f"{op}: q_norm_w has shape {list(q_norm_w.shape)}, expected [head_dim] (even)")
    heads = num_heads + 2 * num_kv_heads
    check(num_kv_heads > 0 and num_heads % num_kv_heads == 0,
          f"{op}: num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    check_shape(op, "norm_w", norm_w, (k,))
    check_shape(op, "w_qkv", w_qkv, (heads * d, k))
    check_shape(op, "k_norm_w", k_norm_w, (d,))
    check(cos_sin.dim() == 2 and cos_sin.shape[1] == d and cos_sin.dtype == torch.float32,
          f"{op}: cos_sin is {cos_sin.dtype} {list(cos_sin.shape)}, expected float32 [max_positions, {d}]")
    check_shape(op, "positions", positions, (m,))
    check_shape(op, "slots", slots, (m,))
    check_index(op, positions=positions, slots=slots)
    check_cache(op, "k_cache", k_cache, num_kv_heads, d)
    check_cache(op, "v_cache", v_cache, num_kv_heads, d)
    check(k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride(),
          f"{op}: k_cache {list(k_cache.shape)} and v_cache {list(v_cache.shape)} differ in shape or strides")
    block = formats.get(fmt).row_block
    check((num_heads * d) % block == (num_kv_heads * d) % block == 0,
          f"{op}: a {fmt} w_qkv needs q and k/v sizes that are multiples of {block}")
    dtype = check_float(op, x=x, norm_w=norm_w, q_norm_w=q_norm_w, k_norm_w=k_norm_w,
                        k_cache=k_cache, v_cache=v_cache)
    check_device(op, x=x, w_qkv=w_qkv, cos_sin=cos_sin, positions=positions, slots=slots, k_cache=k_cache)
    check_rows(op, x=x, w_qkv=w_qkv, cos_sin=cos_sin)
    tiles = tiles_for(op, op, tiles, MatmulTiles, x.device, dtype, fmt, m=m, n=heads * d, k=k, head_dim=d)
    q = torch.empty((m, num_heads, d), dtype=dtype, device=x.device)
    if m == 0:
        return q, k_cache, v_cache
    half, half_p = d // 2, next_pow2(d // 2)
    block_n = min(tiles.block_n, half_p)
    n_tiles = triton.cdiv(half, block_n)
    meta = matmul_meta(tiles, m, k, x.device)
    meta["SWAP"] = meta["SWAP"] and block_n >= 64
    m_tiles = triton.cdiv(m, meta["BLOCK_M"])
    part = torch.empty((m, num_heads + num_kv_heads, d), dtype=torch.float32, device=x.device) if n_tiles > 1 else q
    ws, cnt, stride_ws, stride_wm = split_buffers(op, meta, m, heads * d, heads * n_tiles, x)
    _rmsnorm_qkv_kernel[(heads * n_tiles, m_tiles, meta["SPLIT"])](
        x, norm_w, w_qkv, scale, q_norm_w, k_norm_w, cos_sin, positions, slots, q, k_cache, v_cache, part, ws, cnt,
        m, k, k_cache.shape[0] * k_cache.shape[1], cos_sin.shape[0],
        x.stride(0), w_qkv.stride(0), stride_sn, cos_sin.stride(0), q.stride(0), q.stride(1), k_cache.stride(1),
        k_cache.stride(2), (num_heads + num_kv_heads) * d, stride_ws, stride_wm, float(eps),
        HQ=num_heads, HKV=num_kv_heads, D=d, HALF=half, HALF_P=half_p, BLOCK_N=block_n, TILES=n_tiles,
        PRECISION=precision(dtype), QUANT=formats.get(fmt).code, **meta)
    if n_tiles > 1:
        _qk_epilogue_kernel[(num_heads + num_kv_heads, m_tiles)](
            part, q_norm_w, k_norm_w, cos_sin, positions, slots, q, k_cache, m, k_cache.shape[0] * k_cache.shape[1],
            cos_sin.shape[0], part.stride(0), cos_sin.stride(0), q.stride(0), q.stride(1), k_cache.stride(1),
            k_cache.stride(2), float(eps), HQ=num_heads, D=d, HALF=half, HALF_P=half_p, BLOCK_M=meta["BLOCK_M"],
            PRECISION=precision(dtype), num_warps=4, num_stages=1,
            **pdl_meta(x.device, early=m == 1))
    return q, k_cache, v_cache
