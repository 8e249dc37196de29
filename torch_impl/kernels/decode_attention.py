"""Paged decode attention: one query token per sequence over nano-vllm's cache layout.

q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks]
(-1 padded); context_lens [B]: sequence b attends to its first context_lens[b] cached positions
(its own new key included). A program handles one (sequence, kv head, split): the kv head's
group of query heads is padded to 16 rows so both products run on tensor cores, and an
online softmax streams `block_kv` keys per step. With num_splits > 1 (flash-decoding, for long
contexts at small batch) each split parks (max, sum, acc) in float32 and the last split of a
(sequence, kv head) to arrive merges them - one launch either way. num_splits is fixed when a
CUDA graph is captured; at run time a sequence uses only as many splits as give each at least
MIN_SPLIT_BLOCKS blocks of keys, so a short context runs in one program with nothing to merge.
With one block per sequence (block_tables [B, 1], the standalone runner's layout) the block id is
read once before the loop and the key rows are affine in the loop index, so Triton's pipeliner
prefetches the next tiles: at Qwen3-0.6B batch 1, 144 / 272 positions, 4.75 / 6.83 us per call on
the H100 against 5.57 / 7.68 us over two 256-row blocks (best tiles of each).
Sequences with context_lens 0 (CUDA-graph padding) produce zeros and read nothing.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from common.tiles import AttentionTiles, next_pow2
from torch_impl.kernels import _jit
from torch_impl.kernels._lib import (check, check_cache, check_device, check_float, check_index, check_rows,
                                     pdl_meta, precision, split_counters, tiles_for)

MIN_SPLIT_BLOCKS = 2  # a split covers at least this many blocks of keys: shorter contexts use fewer splits
NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": a fully masked tile never produces NaN


@triton.jit
def attend_range(q, kc_ptr, vc_ptr, bt_ptr, b, kvh, start, end, blk0, nxt, num_blocks, block_size, max_blocks,
                 stride_bt, stride_cslot, stride_ch, offs_d, d_ok, scale, G_PAD: tl.constexpr, D_P: tl.constexpr,
                 BLOCK_KV: tl.constexpr, ALIGNED: tl.constexpr, ONE_BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    """(acc [G_PAD, D_P], max [G_PAD], sum [G_PAD]) float32: the online softmax of q [G_PAD, D_P] (one kv
    head's query heads) over keys start .. end - 1 of sequence b, kv head kvh, `BLOCK_KV` at a time;
    the unnormalized output acc / sum. Addressing (the module doc): ONE_BLOCK, block blk0's rows
    (NO_TABLE: blk0 = b); ALIGNED, tiles within one block, `nxt` the first tile's block id; else a
    block id per key."""
    m_i = tl.full([G_PAD], NEG, tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_P], tl.float32)
    for j0 in range(start, end, BLOCK_KV):
        j = j0 + tl.arange(0, BLOCK_KV)  # [BKV] key positions
        j_ok = j < end
        if ONE_BLOCK:  # (the pipeliner can prefetch loads whose addresses do not wait on a load)
            blk_v = tl.zeros([BLOCK_KV], tl.int64) + blk0
            j_ok = j_ok & (j < block_size) & (blk_v >= 0) & (blk_v < num_blocks)
            rows = blk0 * block_size + j
        elif ALIGNED:  # the tile lies in one cache block: one block id, contiguous rows
            blk = nxt.to(tl.int64)
            nxt = tl.load(bt_ptr + b * stride_bt + tl.minimum((j0 + BLOCK_KV) // block_size, max_blocks - 1))
            blk_v = tl.zeros([BLOCK_KV], tl.int64) + blk  # (a splat: a scalar & vector mask trips the interpreter)
            j_ok = j_ok & (j // block_size < max_blocks) & (blk_v >= 0) & (blk_v < num_blocks)  # stay in the cache
            rows = blk * block_size + (j0 % block_size) + tl.arange(0, BLOCK_KV)
        else:
            blk = tl.load(bt_ptr + b * stride_bt + j // block_size, mask=j_ok & (j // block_size < max_blocks),
                          other=-1).to(tl.int64)
            j_ok = j_ok & (blk >= 0) & (blk < num_blocks)
            rows = blk * block_size + j % block_size
        kv_off = rows[:, None] * stride_cslot + kvh * stride_ch + offs_d[None, :]
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(kc_ptr + kv_off, mask=kv_mask, other=0.0)  # [BKV, D_P]
        v = tl.load(vc_ptr + kv_off, mask=kv_mask, other=0.0)
        s = _jit.dot(q, tl.trans(k), tl.zeros([G_PAD, BLOCK_KV], tl.float32), PRECISION) * scale  # [G_PAD, BKV]
        s = tl.where(j_ok[None, :], s, NEG)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = _jit.dot(_jit.cast(p, v.dtype, PRECISION), v, acc * alpha[:, None], PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def split_keys(ctx, split, SPLITS: tl.constexpr, MIN_SPLIT_BLOCKS: tl.constexpr, BLOCK_KV: tl.constexpr):
    """(active, start, end): how many splits get keys at context length ctx - at most SPLITS, each
    at least MIN_SPLIT_BLOCKS tiles of keys - and split `split`'s keys start .. end - 1 (empty for an
    inactive split: start >= ctx)."""
    active = tl.minimum(tl.maximum(ctx // (MIN_SPLIT_BLOCKS * BLOCK_KV), 1), SPLITS)
    chunk = tl.cdiv(tl.cdiv(ctx, active), BLOCK_KV) * BLOCK_KV
    start = split * chunk
    return active, start, tl.minimum(ctx, start + chunk)


@triton.jit
def park_split(part, acc, m_i, l_i, offs_g, offs_d, D_P: tl.constexpr, W: tl.constexpr):
    """Store one split's (acc, max, sum) at `part` ([G_PAD, W] float32: acc | max | sum), every
    thread's stores done before the caller's release."""
    tl.store(part + offs_g[:, None] * W + offs_d[None, :], acc)
    tl.store(part + offs_g * W + D_P, m_i)
    tl.store(part + offs_g * W + D_P + 1, l_i)
    tl.debug_barrier()


@triton.jit
def merge_splits(part, active, offs_g, offs_d, G_PAD: tl.constexpr, D_P: tl.constexpr, W: tl.constexpr):
    """The normalized output [G_PAD, D_P] of `active` splits parked from `part` on (park_split), read
    past the L1 (other programs wrote them)."""
    m_all = tl.full([G_PAD], NEG, tl.float32)
    for s_ in range(active):
        m_all = tl.maximum(m_all, tl.load(part + s_ * G_PAD * W + offs_g * W + D_P, cache_modifier=".cg"))
    l_all = tl.zeros([G_PAD], tl.float32)
    o = tl.zeros([G_PAD, D_P], tl.float32)
    for s_ in range(active):
        base = part + s_ * G_PAD * W
        w_s = tl.exp(tl.load(base + offs_g * W + D_P, cache_modifier=".cg") - m_all)
        l_all += w_s * tl.load(base + offs_g * W + D_P + 1, cache_modifier=".cg")
        o += w_s[:, None] * tl.load(base + offs_g[:, None] * W + offs_d[None, :], cache_modifier=".cg")
    return o / tl.where(l_all > 0, l_all, 1.0)[:, None]


@triton.jit
def _decode_attention_kernel(
    q_ptr,  # [B, HQ, D]
    kc_ptr, vc_ptr,  # [num_slots, HKV, D] (flattened blocks)
    bt_ptr,  # [B, max_blocks]
    cl_ptr,  # [B]
    out_ptr,  # [B, HQ, D]
    part_ptr,  # [B * HKV * SPLITS, G_PAD, D + 2] float32 scratch (splits only): acc | max | sum
    count_ptr,  # [B * HKV] int32, zero between launches
    num_blocks, block_size, max_blocks,
    stride_qb, stride_qh, stride_cslot, stride_ch, stride_bt, stride_ob, stride_oh,
    scale,
    HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
    BLOCK_KV: tl.constexpr, SPLITS: tl.constexpr, MIN_SPLIT_BLOCKS: tl.constexpr, ALIGNED: tl.constexpr,
    ONE_BLOCK: tl.constexpr, NO_TABLE: tl.constexpr,
    PRECISION: tl.constexpr, W: tl.constexpr,
    PDL: tl.constexpr,
):
    _jit.release_first(PDL)  # PDL 2: the next kernel launches and streams its weights meanwhile
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_P)
    g_ok = offs_g < G
    d_ok = offs_d < D
    # context_lens and block_tables are read before waiting for the previous kernel (programmatic
    # dependent launch): the model's decode step writes them before its first layer, never in the
    # launch right before this one; only q and the newest key and value come from that launch.
    ctx = tl.load(cl_ptr + b)
    # Splits that get keys: at most SPLITS, each with at least MIN_SPLIT_BLOCKS blocks (short
    # contexts run in one program, with no partials to merge); the others have nothing to do.
    active, start, end = split_keys(ctx, split, SPLITS, MIN_SPLIT_BLOCKS, BLOCK_KV)
    blk0 = b.to(tl.int64)  # NO_TABLE (block_tables None): block b holds sequence b
    nxt = 0  # ALIGNED only
    if ONE_BLOCK and not NO_TABLE:  # one block per sequence: its id, read once; key rows are then affine in the loop index
        blk0 = tl.load(bt_ptr + b * stride_bt).to(tl.int64)
    elif ALIGNED and not NO_TABLE:  # the first tile's block id; each step then fetches the next one ahead
        nxt = tl.load(bt_ptr + b * stride_bt + tl.minimum(start // block_size, max_blocks - 1))
    _jit.wait_prior(PDL)

    heads = kvh * G + offs_g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [G_PAD, D_P]
    acc, m_i, l_i = attend_range(q, kc_ptr, vc_ptr, bt_ptr, b, kvh, start, end, blk0, nxt, num_blocks, block_size,
                                 max_blocks, stride_bt, stride_cslot, stride_ch, offs_d, d_ok, scale, G_PAD, D_P,
                                 BLOCK_KV, ALIGNED, ONE_BLOCK, PRECISION)

    _jit.release_after(PDL)  # PDL 1: the loads are done
    out = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    o_mask = g_ok[:, None] & d_ok[None, :]
    if SPLITS == 1:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out, _jit.cast(o, out.dtype.element_ty, PRECISION), mask=o_mask)
    elif active == 1:
        if split == 0:
            o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out, _jit.cast(o, out.dtype.element_ty, PRECISION), mask=o_mask)
    elif split < active:
        row = (b * HKV + kvh) * SPLITS
        park_split(part_ptr + (row + split) * G_PAD * W, acc, m_i, l_i, offs_g, offs_d, D_P, W)
        arrived = tl.atomic_add(count_ptr + b * HKV + kvh, 1, sem="acq_rel", scope="gpu")
        if arrived == active - 1:  # the last split merges all of them
            o = merge_splits(part_ptr + row * G_PAD * W, active, offs_g, offs_d, G_PAD, D_P, W)
            tl.store(out, _jit.cast(o, out.dtype.element_ty, PRECISION), mask=o_mask)
            tl.atomic_xchg(count_ptr + b * HKV + kvh, 0)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, *,
                     tiles: AttentionTiles | None = None) -> torch.Tensor:
    """[B, Hq, D] attention of each sequence's query over its first meta.context_lens[b] cached keys
    (scale 1/sqrt(D), GQA); meta.block_tables [B, max_blocks], or None: block b holds sequence b.

    `tiles` defaults to common.tiles' choice for (B, Hkv, max_blocks * block_size): the split count
    must be fixed before a CUDA graph is captured, so it follows the table's capacity, while each
    split's share of keys follows the actual context length at run time.
    """
    op = "decode_attention"
    block_tables, context_lens = meta.block_tables, meta.context_lens
    check(q.dim() == 3, f"{op}: q has shape {list(q.shape)}, expected [B, num_heads, head_dim]")
    b, hq, d = q.shape
    check(k_cache.dim() == 4, f"{op}: k_cache has shape {list(k_cache.shape)}, expected [blocks, bs, Hkv, {d}]")
    hkv = k_cache.shape[2]
    check(hkv > 0 and hq % hkv == 0, f"{op}: q has {hq} heads, not a multiple of the cache's {hkv} kv heads")
    check_cache(op, "k_cache", k_cache, hkv, d)
    check_cache(op, "v_cache", v_cache, hkv, d)
    check(k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride(),
          f"{op}: k_cache {list(k_cache.shape)} and v_cache {list(v_cache.shape)} differ in shape or strides")
    no_table = block_tables is None
    if no_table:
        check(k_cache.shape[0] >= b, f"{op}: block_tables None needs one cache block per sequence: "
                                     f"{k_cache.shape[0]} blocks for {b} sequences")
        block_tables = context_lens.view(b, 1)  # never read (NO_TABLE): an int tensor on the device
    check(block_tables.dim() == 2 and block_tables.shape[0] == b,
          f"{op}: block_tables has shape {list(block_tables.shape)}, expected [{b}, max_blocks]")
    check(context_lens.shape == (b,), f"{op}: context_lens has shape {list(context_lens.shape)}, expected [{b}]")
    check_index(op, block_tables=block_tables, context_lens=context_lens)
    check_float(op, q=q, k_cache=k_cache, v_cache=v_cache)
    check_device(op, q=q, k_cache=k_cache, block_tables=block_tables, context_lens=context_lens)
    check_rows(op, q=q, block_tables=block_tables)
    bs, max_blocks = k_cache.shape[1], 1 if no_table else block_tables.shape[1]
    tiles = tiles_for(op, op, tiles, AttentionTiles, q.device, q.dtype, batch=b, num_kv_heads=hkv,
                      max_context=max_blocks * bs, one_block=max_blocks == 1)
    check(tiles.block_kv >= 16, f"{op}: tiles.block_kv={tiles.block_kv}, expected >= 16 (tensor-core tile)")
    out = torch.empty((b, hq, d), dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    group = hq // hkv
    g_pad, d_p = max(16, next_pow2(group)), max(16, next_pow2(d))
    splits = tiles.num_splits
    if splits > 1:
        part = torch.empty((b * hkv * splits, g_pad, d_p + 2), dtype=torch.float32, device=q.device)
        counters = split_counters("decode_attention", q.device, b * hkv, "(sequence, kv head) pairs",
                                  "use num_splits=1")
    else:
        part = counters = out  # unused
    _decode_attention_kernel[(b, hkv, splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part, counters,
        k_cache.shape[0], bs, max_blocks,
        q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), 1.0 / math.sqrt(d),
        HKV=hkv, G=group, G_PAD=g_pad, D=d, D_P=d_p, BLOCK_KV=tiles.block_kv, SPLITS=splits,
        MIN_SPLIT_BLOCKS=MIN_SPLIT_BLOCKS, ALIGNED=bs % tiles.block_kv == 0, ONE_BLOCK=max_blocks == 1,
        NO_TABLE=no_table, W=d_p + 2,
        PRECISION=precision(q.dtype), num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        **pdl_meta(q.device, early=b == 1))
    return out
