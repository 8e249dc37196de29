"""Variable-length causal prefill attention in Pallas (Triton): flash attention over the KV cache.

q [T, Hq, D] holds the new tokens of B sequences back to back (meta.cu_seqlens_q [B + 1]);
sequence b has cu_seqlens_k[b + 1] - cu_seqlens_k[b] keys, its cached prefix first, so its new
token i sits at position len_k - len_q + i and sees keys 0 .. that position. Keys and values are
read from the caches [num_blocks, block_size, Hkv, D] (rmsnorm_qkv wrote this step's rows): key j
of sequence b at row j of block b (meta.block_tables None: jax_impl.model's layout, read as
windows of consecutive rows) or at block_tables[b, j // block_size] * block_size + j % block_size.
Grid (B, Hq, cdiv(max_seqlen_q, block_m)): a program takes block_m queries of one head and runs an
online softmax (float32) over block_n keys at a time, up to the last key its queries can see, in
two loops: the blocks every query of the tile sees whole (below the diagonal: no causal mask, the
bulk of a long prompt), then the blocks that cross the diagonal (masked). GQA by reading kv head
h // (Hq / Hkv); scale 1/sqrt(D). The twin of torch_impl/kernels/prefill_attention.py.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from common.tiles import PrefillTiles
from jax_impl.kernels._jit import F32, dot, gather_index, load, store
from jax_impl.kernels._lib import check, check_float, check_int, check_shape, pallas_call, tiles_for

NEG = -1e30  # finite "minus infinity": a fully masked row never produces NaN


def _prefill_attention_kernel(q_ref,    # [t, hq, d]
                              k_ref,    # [rows, hkv, d]  (flattened cache)
                              v_ref,    # [rows, hkv, d]
                              cuq_ref,  # [b + 1] int32
                              cuk_ref,  # [b + 1] int32
                              *refs,    # [bt_ref [b, max_blocks] int32 if paged], o_ref [t, hq, d]
                              paged: bool, group: int, block_size: int, block_m: int, block_n: int, scale: float):
    bt_ref, o_ref = refs if paged else (None, refs[0])
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kvh = h // group
    q0 = load(cuq_ref.at[b])
    len_q = load(cuq_ref.at[b + 1]) - q0
    len_k = load(cuk_ref.at[b + 1]) - load(cuk_ref.at[b])
    m0 = i * block_m
    qi = m0 + jnp.arange(block_m)  # query index within the sequence
    rmask = qi < len_q
    qpos = len_k - len_q + qi  # absolute positions
    q = load(q_ref.at[pl.ds(q0 + m0, block_m), h, :], mask=rmask[:, None], other=0)  # [block_m, d]
    # causal: this tile's last query sees keys up to len_k - len_q + m0 + block_m - 1, its first (and
    # so every query of the tile) keys 0 .. len_k - len_q + m0: whole blocks of those need no mask
    end = jnp.where(m0 < len_q, jnp.minimum(len_k, len_k - len_q + m0 + block_m), 0)
    full = jnp.minimum(jnp.maximum(len_k - len_q + m0 + 1, 0) // block_n, pl.cdiv(jnp.maximum(end, 0), block_n))

    def step(causal: bool):
        def body(j, carry):
            acc, m_prev, l_prev = carry
            n0 = j * block_n
            cols = n0 + jnp.arange(block_n)
            cmask = (cols < end) & (paged or cols < block_size)
            if paged:  # gathered through the table
                blk = load(bt_ref.at[b, cols // block_size], mask=cmask, other=0)
                cmask = cmask & (blk >= 0)
                r, c = gather_index(jnp.where(cmask, blk * block_size + cols % block_size, 0), 0, d)
                window = (r, kvh, c)
            else:  # sequence b's own block: rows b * block_size + key, affine in j
                window = (pl.ds(b * block_size + n0, block_n), kvh, pl.ds(0, d))
            k = load(k_ref.at[window], mask=cmask[:, None], other=0)  # [block_n, d]
            v = load(v_ref.at[window], mask=cmask[:, None], other=0)
            sc = dot(q, k, ((1,), (1,))) * scale  # [block_m, block_n]
            if causal:
                visible = cmask[None, :] & (cols[None, :] <= qpos[:, None])
                sc = jnp.where(visible, sc, NEG)
            m_new = jnp.maximum(m_prev, jnp.max(sc, axis=1))
            p = jnp.exp(sc - m_new[:, None])
            if causal:
                p = jnp.where(visible, p, 0.0)
            corr = jnp.exp(m_prev - m_new)
            acc = acc * corr[:, None] + dot(p.astype(v.dtype), v, ((1,), (0,)))
            return acc, m_new, l_prev * corr + jnp.sum(p, axis=1)
        return body

    d = q.shape[-1]
    init = (jnp.zeros((block_m, d), F32), jnp.full((block_m,), NEG, F32), jnp.zeros((block_m,), F32))
    carry = lax.fori_loop(0, full, step(causal=False), init)  # whole blocks below the diagonal
    acc, _, l_i = lax.fori_loop(full, pl.cdiv(jnp.maximum(end, 0), block_n), step(causal=True), carry)
    out = acc / jnp.maximum(l_i, 1e-30)[:, None]
    store(o_ref.at[pl.ds(q0 + m0, block_m), h, :], out.astype(o_ref.dtype), mask=rmask[:, None])


def prefill_attention(q, k_cache, v_cache, meta, *, tiles: PrefillTiles | None = None,
                      interpret: bool | None = None):
    """Causal attention of the new tokens q [T, Hq, D] -> [T, Hq, D] in q.dtype; layout in the module doc.

    meta.max_seqlen_q (a Python int) sizes the grid; it must be at least every sequence's new-token
    count. Rows of q that belong to no sequence are left as they come out (don't-care).
    """
    op = "prefill_attention"
    cu_q, cu_k, block_tables = meta.cu_seqlens_q, meta.cu_seqlens_k, meta.block_tables
    check(q.ndim == 3, f"{op}: q: expected [T, Hq, D], got shape {q.shape}")
    t_tok, hq, d = q.shape
    check(k_cache.ndim == 4 and k_cache.shape[3] == d,
            f"{op}: k_cache: expected [num_blocks, block_size, Hkv, {d}], got {k_cache.shape}")
    num_blocks, block_size, hkv, _ = k_cache.shape
    check_shape(f"{op}: v_cache", v_cache, k_cache.shape)
    check(hq % hkv == 0, f"{op}: q heads {hq} must be a multiple of kv heads {hkv}")
    check(d >= 16 and d & (d - 1) == 0, f"{op}: head_dim={d}: expected a power of two >= 16")
    check(cu_q.ndim == 1 and cu_k.shape == cu_q.shape,
            f"{op}: cu_seqlens_q {cu_q.shape} and cu_seqlens_k {cu_k.shape}: expected [B + 1] each")
    check_int(f"{op}: cu_seqlens_q", cu_q)
    check_int(f"{op}: cu_seqlens_k", cu_k)
    bsz = cu_q.shape[0] - 1
    paged = block_tables is not None
    if paged:
        check(block_tables.ndim == 2 and block_tables.shape[0] == bsz,
                f"{op}: block_tables: expected [{bsz}, max_blocks], got {block_tables.shape}")
        check_int(f"{op}: block_tables", block_tables)
    else:
        check(num_blocks >= bsz, f"{op}: block_tables None needs one cache block per sequence: "
                                   f"{num_blocks} blocks for {bsz} sequences")
    max_q = meta.max_seqlen_q
    check(isinstance(max_q, int) and max_q >= 0, f"{op}: meta.max_seqlen_q={max_q!r}, expected an int >= 0")
    check_float(f"{op}: q", q)
    check_float(f"{op}: k_cache", k_cache, q.dtype)
    check_float(f"{op}: v_cache", v_cache, q.dtype)
    t = tiles_for(op, op, tiles, PrefillTiles, q.dtype, max_seqlen_q=max_q, head_dim=d)
    if bsz == 0 or max_q == 0 or t_tok == 0:
        return jnp.zeros_like(q)
    kernel = functools.partial(_prefill_attention_kernel, paged=paged, group=hq // hkv, block_size=block_size,
                               block_m=t.block_m, block_n=t.block_n, scale=1.0 / math.sqrt(d))
    return pallas_call(kernel, name=op, grid=(bsz, hq, pl.cdiv(max_q, t.block_m)),
                         out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), num_warps=t.num_warps,
                         num_stages=t.num_stages, interpret=interpret)(
        q, k_cache.reshape(-1, hkv, d), v_cache.reshape(-1, hkv, d), cu_q, cu_k,
        *([block_tables] if paged else []))
