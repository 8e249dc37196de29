"""Causal prefill attention in Pallas (Triton): flash attention over right-padded prompts.

q [B, L, Hq, D], k and v [B, L, Hkv, D] (jax_impl.model's prefill layout: every sequence from
position 0, lengths[b] real tokens, the rest padding). Grid (B, Hq, cdiv(L, block_m)): a
program takes block_m queries of one head and runs an online softmax (float32) over block_n
keys at a time, up to the last key its queries can see (causal) and the sequence's length;
GQA by reading kv head h // (Hq / Hkv). Scale 1/sqrt(D); rows past a sequence's length are
don't-care (finite). The twin of torch_impl/kernels/prefill_attention.py, which takes nano-vllm's
variable-length layouts instead.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from common.tiles import PrefillTiles
from jax_impl.kernels import _common as C

NEG = -1e30  # finite "minus infinity": a fully masked row never produces NaN


def _prefill_attention_kernel(q_ref,    # [b, l, hq, d]
                              k_ref,    # [b, l, hkv, d]
                              v_ref,    # [b, l, hkv, d]
                              len_ref,  # [b] int32
                              o_ref,    # [b, l, hq, d]
                              *, l: int, group: int, block_m: int, block_n: int, scale: float):
    b, h, i = C.pl.program_id(0), C.pl.program_id(1), C.pl.program_id(2)
    kvh = h // group
    m0 = i * block_m
    rows = m0 + jnp.arange(block_m)
    rmask = rows < l
    q = C.load(q_ref.at[b, C.pl.ds(m0, block_m), h, :], mask=rmask[:, None], other=0)  # [block_m, d]
    length = C.load(len_ref.at[b])
    # keys 0 .. min(last query of the tile, length - 1)
    end = jnp.minimum(jnp.minimum(m0 + block_m, l), length)

    def body(j, carry):
        acc, m_prev, l_prev = carry
        n0 = j * block_n
        cols = n0 + jnp.arange(block_n)
        cmask = cols < end
        k = C.load(k_ref.at[b, C.pl.ds(n0, block_n), kvh, :], mask=cmask[:, None], other=0)  # [block_n, d]
        v = C.load(v_ref.at[b, C.pl.ds(n0, block_n), kvh, :], mask=cmask[:, None], other=0)
        sc = C.dot(q, k, ((1,), (1,))) * scale  # [block_m, block_n]
        visible = cmask[None, :] & (cols[None, :] <= rows[:, None])
        sc = jnp.where(visible, sc, NEG)
        m_new = jnp.maximum(m_prev, jnp.max(sc, axis=1))
        p = jnp.where(visible, jnp.exp(sc - m_new[:, None]), 0.0)
        corr = jnp.exp(m_prev - m_new)
        acc = acc * corr[:, None] + C.dot(p.astype(v.dtype), v, ((1,), (0,)))
        return acc, m_new, l_prev * corr + jnp.sum(p, axis=1)

    d = q.shape[-1]
    init = (jnp.zeros((block_m, d), C.F32), jnp.full((block_m,), NEG, C.F32), jnp.zeros((block_m,), C.F32))
    acc, _, l_i = lax.fori_loop(0, C.pl.cdiv(jnp.maximum(end, 0), block_n), body, init)
    out = acc / jnp.maximum(l_i, 1e-30)[:, None]
    C.store(o_ref.at[b, C.pl.ds(m0, block_m), h, :], out.astype(o_ref.dtype), mask=rmask[:, None])


def prefill_attention(q, k, v, lengths, *, tiles: PrefillTiles | None = None, interpret: bool | None = None):
    """Causal attention within each right-padded sequence from position 0 (ops_plain's op).

    q [B, L, Hq, D]; k, v [B, L, Hkv, D]; lengths [B] int32. Returns [B, L, Hq, D] in q.dtype;
    rows past a sequence's length are don't-care.
    """
    op = "prefill_attention"
    C.check(q.ndim == 4, f"{op}: q: expected [B, L, Hq, D], got shape {q.shape}")
    bsz, l, hq, d = q.shape
    C.check(k.ndim == 4 and k.shape[:2] == (bsz, l) and k.shape[3] == d,
            f"{op}: k: expected [{bsz}, {l}, Hkv, {d}], got shape {k.shape}")
    hkv = k.shape[2]
    C.check(hq % hkv == 0, f"{op}: q heads {hq} must be a multiple of kv heads {hkv}")
    C.check(d >= 16 and d & (d - 1) == 0, f"{op}: head_dim={d}: expected a power of two >= 16")
    C.check_shape(f"{op}: v", v, k.shape)
    C.check_shape(f"{op}: lengths", lengths, (bsz,))
    C.check_int(f"{op}: lengths", lengths)
    C.check_float(f"{op}: q", q)
    C.check_float(f"{op}: k", k, q.dtype)
    C.check_float(f"{op}: v", v, q.dtype)
    t = tiles or PrefillTiles.default_for(l, d)
    C.check(isinstance(t, PrefillTiles), f"{op}: tiles={t!r}, expected a common.tiles.PrefillTiles")
    kernel = functools.partial(_prefill_attention_kernel, l=l, group=hq // hkv, block_m=t.block_m,
                               block_n=t.block_n, scale=1.0 / math.sqrt(d))
    return C.pallas_call(kernel, name=op, grid=(bsz, hq, C.pl.cdiv(l, t.block_m)),
                         out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), num_warps=t.num_warps,
                         num_stages=t.num_stages, interpret=interpret)(q, k, v, lengths)
