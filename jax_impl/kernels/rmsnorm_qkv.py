"""Qwen3's whole pre-attention path in one Pallas (Triton) kernel.

RMSNorm(x) (rounded to x.dtype before the matmul, Hugging Face's order) times the packed
w_qkv [(Hq + 2 Hkv) D, hidden], then per head: q/k-norm (RMSNorm over head_dim) and
rotate-half RoPE in float32, q written out, k and v scattered into the paged caches at
`slots` (-1 = skip) through input_output_aliases.

Grid (cdiv(T, block_m), Hq + 2 Hkv): one program per head (block_n = head_dim) and token
block, so the per-head norm needs no cross-program reduction. The head's two halves are two
accumulators (rows [0, D/2) and [D/2, D) of the head), which makes rotate-half elementwise.
Program j < Hq is a q head, then Hkv k heads, then Hkv v heads; every program computes the
tiny epilogue of each kind and masked stores keep the one that applies.

Split variant (tiles.block_n < head_dim): when one program per head leaves most SMs idle,
kernel 1 computes RMSNorm(x) @ w_qkv.T in f32 with block_n-row tiles (many programs) and
kernel 2 runs the same per-head epilogue on that [T, N] buffer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from common import formats
from common.tiles import MatmulTiles
from jax_impl.kernels._jit import F32, gather_index, load, project, store
from jax_impl.kernels._lib import check, check_float, check_int, check_shape, pallas_call, split_weight, tiles_for


def _qkv_epilogue(lo, hi, *, j, m0, qn_ref, kn_ref, cs_ref, pos_ref, slot_ref, q_ref, kc_ref, vc_ref,
                  m: int, hq: int, hkv: int, d: int, eps: float, block_m: int):
    """Head j's output halves lo, hi [block_m, d/2] (f32): q/k-norm, RoPE, store q or k/v."""
    half = d // 2
    rmask = (m0 + jnp.arange(block_m)) < m
    is_q = j < hq
    is_k = (j >= hq) & (j < hq + hkv)
    is_v = j >= hq + hkv
    # q/k-norm over the whole head (both halves), in f32.
    first, second = pl.ds(0, half), pl.ds(half, half)
    w_lo = jnp.where(is_q, load(qn_ref.at[first]), load(kn_ref.at[first])).astype(F32)
    w_hi = jnp.where(is_q, load(qn_ref.at[second]), load(kn_ref.at[second])).astype(F32)
    r = jax.lax.rsqrt((jnp.sum(lo * lo, axis=1) + jnp.sum(hi * hi, axis=1)) / d + eps)[:, None]
    n_lo, n_hi = lo * r * w_lo[None, :], hi * r * w_hi[None, :]
    # rotate-half RoPE at each token's position.
    tok = pl.ds(m0, block_m)
    pos = load(pos_ref.at[tok], mask=rmask, other=0)
    cos = load(cs_ref.at[gather_index(pos, 0, half)], mask=rmask[:, None], other=0)  # [block_m, half]
    sin = load(cs_ref.at[gather_index(pos, half, half)], mask=rmask[:, None], other=0)
    rot_lo = n_lo * cos - n_hi * sin
    rot_hi = n_hi * cos + n_lo * sin

    qmask = rmask[:, None] & is_q
    jq = jnp.minimum(j, hq - 1)
    store(q_ref.at[tok, jq, first], rot_lo.astype(q_ref.dtype), mask=qmask)
    store(q_ref.at[tok, jq, second], rot_hi.astype(q_ref.dtype), mask=qmask)
    slots = load(slot_ref.at[tok], mask=rmask, other=-1)
    valid = rmask & (slots >= 0)
    smask = valid[:, None]
    # Masked lanes point one row past the end: never touched on the GPU, and dropped (not
    # clobbering a written row, as a duplicate index could) by the interpreter's scatter.
    srow = jnp.where(valid, slots, kc_ref.shape[0])
    jk = jnp.clip(j - hq, 0, hkv - 1)
    jv = jnp.clip(j - hq - hkv, 0, hkv - 1)
    (r0, c0), (r1, c1) = gather_index(srow, 0, half), gather_index(srow, half, half)
    store(kc_ref.at[r0, jk, c0], rot_lo.astype(kc_ref.dtype), mask=smask & is_k)
    store(kc_ref.at[r1, jk, c1], rot_hi.astype(kc_ref.dtype), mask=smask & is_k)
    store(vc_ref.at[r0, jv, c0], lo.astype(vc_ref.dtype), mask=smask & is_v)
    store(vc_ref.at[r1, jv, c1], hi.astype(vc_ref.dtype), mask=smask & is_v)


def _rmsnorm_qkv_kernel(x_ref,      # [m, k]
                        nw_ref,     # [k]
                        w_ref,      # [(hq + 2 hkv) * d, k]
                        qn_ref,     # [d]
                        kn_ref,     # [d]
                        cs_ref,     # [max_pos, d] f32: [cos | sin]
                        pos_ref,    # [m] int32
                        slot_ref,   # [m] int32
                        kc_in,      # [rows, hkv, d] (aliased to kc_ref)
                        vc_in,      # [rows, hkv, d] (aliased to vc_ref)
                        *refs,      # [s_ref: w's scales, when quantized], q_ref [m, hq, d], kc_ref, vc_ref
                        m: int, k: int, hq: int, hkv: int, d: int, eps: float,
                        block_m: int, block_k: int, fmt: str | None):
    """Fused: one program per (token block, head) streams the head's rows of w_qkv."""
    del kc_in, vc_in
    wq = (refs[0], fmt) if fmt else None
    q_ref, kc_ref, vc_ref = refs[-3:]
    half = d // 2
    m0 = pl.program_id(0) * block_m
    j = pl.program_id(1)
    all_n = jnp.arange(half) < half
    lo, hi = project(x_ref, w_ref, [(j * d, all_n), (j * d + half, all_n)], m0=m0, m=m, k=k,
                       block_m=block_m, block_n=half, block_k=block_k, norm=(nw_ref, eps), wq=wq)
    _qkv_epilogue(lo, hi, j=j, m0=m0, qn_ref=qn_ref, kn_ref=kn_ref, cs_ref=cs_ref, pos_ref=pos_ref,
                  slot_ref=slot_ref, q_ref=q_ref, kc_ref=kc_ref, vc_ref=vc_ref, m=m, hq=hq, hkv=hkv, d=d,
                  eps=eps, block_m=block_m)


def _norm_linear_kernel(x_ref,   # [m, k]
                        nw_ref,  # [k]
                        w_ref,   # [n, k]
                        *refs,   # [s_ref: w's scales, when quantized], o_ref [m, n] f32
                        m: int, n: int, k: int, eps: float, block_m: int, block_n: int, block_k: int,
                        fmt: str | None):
    """Split variant, kernel 1: RMSNorm(x) @ w.T in f32 with small block_n (many programs)."""
    wq = (refs[0], fmt) if fmt else None
    o_ref = refs[-1]
    m0 = pl.program_id(0) * block_m
    n0 = pl.program_id(1) * block_n
    nmask = (n0 + jnp.arange(block_n)) < n
    (acc,) = project(x_ref, w_ref, [(n0, nmask)], m0=m0, m=m, k=k, block_m=block_m, block_n=block_n,
                       block_k=block_k, norm=(nw_ref, eps), wq=wq)
    mask = ((m0 + jnp.arange(block_m)) < m)[:, None] & nmask[None, :]
    store(o_ref.at[pl.ds(m0, block_m), pl.ds(n0, block_n)], acc, mask=mask)


def _qk_norm_rope_kernel(qkv_ref, qn_ref, kn_ref, cs_ref, pos_ref, slot_ref, kc_in, vc_in,
                         q_ref, kc_ref, vc_ref, *, m: int, hq: int, hkv: int, d: int, eps: float,
                         block_m: int):
    """Split variant, kernel 2: per (token block, head) epilogue on the f32 qkv [m, n]."""
    del kc_in, vc_in
    half = d // 2
    m0 = pl.program_id(0) * block_m
    j = pl.program_id(1)
    rmask = ((m0 + jnp.arange(block_m)) < m)[:, None]
    tok = pl.ds(m0, block_m)
    lo = load(qkv_ref.at[tok, pl.ds(j * d, half)], mask=rmask, other=0)
    hi = load(qkv_ref.at[tok, pl.ds(j * d + half, half)], mask=rmask, other=0)
    _qkv_epilogue(lo, hi, j=j, m0=m0, qn_ref=qn_ref, kn_ref=kn_ref, cs_ref=cs_ref, pos_ref=pos_ref,
                  slot_ref=slot_ref, q_ref=q_ref, kc_ref=kc_ref, vc_ref=vc_ref, m=m, hq=hq, hkv=hkv, d=d,
                  eps=eps, block_m=block_m)


def rmsnorm_qkv(x, norm_w, w_qkv, q_norm_w, k_norm_w, cos_sin, k_cache, v_cache, meta, *,
                num_heads: int, num_kv_heads: int, eps: float, tiles: MatmulTiles | None = None,
                interpret: bool | None = None):
    """-> (q [T, Hq, D] in x.dtype, k_cache, v_cache) with this step's k (normed, roped) and v at slots.

    x [T, hidden]; norm_w [hidden]; w_qkv [(Hq + 2 Hkv) D, hidden] rows [q; k; v] (or a quantized
    common.formats.QWeight of that shape);
    q_norm_w, k_norm_w [D]; cos_sin [max_pos, D] float32 ([:, :D/2] cos, [:, D/2:] sin);
    meta.positions, meta.slots [T] int32 (slot = block * block_size + offset; -1 = not written);
    k_cache, v_cache [num_blocks, block_size, Hkv, D]. tiles.block_n == D: one fused launch;
    tiles.block_n < D: the split variant (two launches, more programs for the projection).
    """
    positions, slots = meta.positions, meta.slots
    check(x.ndim == 2, f"rmsnorm_qkv: x: expected [T, hidden], got shape {x.shape}")
    check_float("rmsnorm_qkv: x", x)
    w_qkv, scales, fmt = split_weight("rmsnorm_qkv: w_qkv", w_qkv, x.dtype)
    m, k = x.shape
    check(q_norm_w.ndim == 1, f"rmsnorm_qkv: q_norm_w: expected [head_dim], got shape {q_norm_w.shape}")
    d = q_norm_w.shape[0]
    half = d // 2
    check(d % 2 == 0 and half & (half - 1) == 0,
            f"rmsnorm_qkv: head_dim={d}: expected twice a power of two (RoPE halves are loaded as blocks)")
    hq, hkv = int(num_heads), int(num_kv_heads)
    check(hq > 0 and hkv > 0 and hq % hkv == 0, f"rmsnorm_qkv: {num_heads=} must be a multiple of {num_kv_heads=}")
    check_shape("rmsnorm_qkv: norm_w", norm_w, (k,))
    check_shape("rmsnorm_qkv: w_qkv", w_qkv, ((hq + 2 * hkv) * d, k))
    check_shape("rmsnorm_qkv: k_norm_w", k_norm_w, (d,))
    check(cos_sin.ndim == 2 and cos_sin.shape[1] == d and cos_sin.dtype == jnp.float32,
            f"rmsnorm_qkv: cos_sin: expected float32 [max_pos, {d}], got {cos_sin.dtype} {cos_sin.shape}")
    check_shape("rmsnorm_qkv: positions", positions, (m,))
    check_shape("rmsnorm_qkv: slots", slots, (m,))
    check_int("rmsnorm_qkv: positions", positions)
    check_int("rmsnorm_qkv: slots", slots)
    check(k_cache.ndim == 4 and k_cache.shape[2:] == (hkv, d),
            f"rmsnorm_qkv: k_cache: expected [num_blocks, block_size, {hkv}, {d}], got {k_cache.shape}")
    check_shape("rmsnorm_qkv: v_cache", v_cache, k_cache.shape)
    check_float("rmsnorm_qkv: k_cache", k_cache)
    check_float("rmsnorm_qkv: v_cache", v_cache, k_cache.dtype)
    block = formats.get(fmt).row_block
    check((hq * d) % block == (hkv * d) % block == 0,
            f"rmsnorm_qkv: a {fmt} w_qkv needs q and k/v sizes that are multiples of {block}")
    t = tiles_for("rmsnorm_qkv", "rmsnorm_qkv", tiles, MatmulTiles, x.dtype, fmt, m=m, n=w_qkv.shape[0], k=k,
                    head_dim=d)
    check(t.block_n <= d, f"rmsnorm_qkv: tiles.block_n={t.block_n}: expected head_dim={d} "
            f"(fused, one head per program) or less (split: projection kernel + per-head epilogue kernel)")

    cache_shape = k_cache.shape
    kc = k_cache.reshape(-1, hkv, d)  # [num_blocks * block_size, Hkv, D], free
    vc = v_cache.reshape(-1, hkv, d)
    heads = hq + 2 * hkv
    grid = (pl.cdiv(m, t.block_m), heads)
    out_shape = (jax.ShapeDtypeStruct((m, hq, d), x.dtype),
                 jax.ShapeDtypeStruct(kc.shape, kc.dtype), jax.ShapeDtypeStruct(vc.shape, vc.dtype))
    statics = dict(m=m, hq=hq, hkv=hkv, d=d, eps=float(eps), block_m=t.block_m)
    if t.block_n == d:  # fused: one launch
        kernel = functools.partial(_rmsnorm_qkv_kernel, k=k, block_k=t.block_k, fmt=fmt, **statics)
        q, kc, vc = pallas_call(kernel, name="rmsnorm_qkv", grid=grid, out_shape=out_shape,
                                  num_warps=t.num_warps, num_stages=t.num_stages, interpret=interpret,
                                  input_output_aliases={8: 1, 9: 2})(
            x, norm_w, w_qkv, q_norm_w, k_norm_w, cos_sin, positions, slots, kc, vc, *scales)
    else:  # split: norm + projection with many programs, then the per-head epilogue
        n = heads * d
        lin = functools.partial(_norm_linear_kernel, m=m, n=n, k=k, eps=float(eps), block_m=t.block_m,
                                block_n=t.block_n, block_k=t.block_k, fmt=fmt)
        qkv = pallas_call(lin, name="rmsnorm_qkv_linear", grid=(grid[0], pl.cdiv(n, t.block_n)),
                            out_shape=jax.ShapeDtypeStruct((m, n), F32), num_warps=t.num_warps,
                            num_stages=t.num_stages, interpret=interpret)(x, norm_w, w_qkv, *scales)
        epi = functools.partial(_qk_norm_rope_kernel, **statics)
        q, kc, vc = pallas_call(epi, name="rmsnorm_qkv_epilogue", grid=grid, out_shape=out_shape,
                                  # one token: one warp per head (0.6B: 1.46 vs 1.66 us per layer with 4)
                                  num_warps=1 if t.block_m == 1 else 4, num_stages=1, interpret=interpret,
                                  input_output_aliases={6: 1, 7: 2})(
            qkv, q_norm_w, k_norm_w, cos_sin, positions, slots, kc, vc)
    return q, kc.reshape(cache_shape), vc.reshape(cache_shape)
