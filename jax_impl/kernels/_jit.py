"""In-kernel helpers the Pallas kernels share (traced into each kernel; no launcher here): masked
loads and stores, the f32 dot, gather indices, and the projection loop (`project`) with its decode
form, RMSNorm's statistic and the quantized weights' scales. jax_impl.kernels._lib is the host side.

Only names that exist in both jax 0.10.2 (CPU, CI) and 0.11.2 (the GPU) are used:
`pltriton.load/store` with mask and `other`, `pl.program_id`, `pl.ds`, `pl.cdiv`, `lax.fori_loop`,
`jax.lax.dot_general(preferred_element_type=f32)`.

Kernels take whole arrays as refs (no BlockSpecs) and address them with `pl.ds` windows and
masked loads/stores, so array sizes need not be powers of two; every loaded or stored window is.
Sizes reach the kernels as static Python ints, never `pl.num_programs()` (jax issue 40847).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from common import formats
from jax_impl.arrays import precision_for

QBLOCK = formats.get("fp8").scale_block[0]  # the edge of fp8 weights' square scale blocks

F32 = jnp.float32
# Tiles with block_m >= DOT_MIN_M use the tensor-core dot; smaller ones multiply and reduce
# (decode GEMV: the token is not padded to 16 rows, the weights stream at the copy bandwidth).
DOT_MIN_M = 16
load = pltriton.load
store = pltriton.store


def dot(a, b, contract):
    """2-D dot with f32 accumulation; float32 operands multiply in full precision (the Triton
    lowering maps the default precision to TF32), bf16 ones on the tensor cores as they are."""
    return lax.dot_general(a, b, (contract, ((), ())), precision=precision_for(a.dtype),
                           preferred_element_type=F32)


def gather_index(rows, col0, ncols: int):
    """Index arrays [len(rows), ncols] for rows x columns col0..col0+ncols of a ref.

    Gathers (rows from an index vector) use integer arrays on every indexed axis: the
    interpreter cannot mix integer-array indexers with pl.ds slices; the Triton lowering
    takes either form.
    """
    shape = (rows.shape[0], ncols)
    return (jnp.broadcast_to(rows[:, None], shape),
            jnp.broadcast_to(col0 + jnp.arange(ncols)[None, :], shape))


def rms_rstd(x_ref, m0, m: int, k: int, block_m: int, block_k: int, eps: float):
    """1/sqrt(mean(x^2) + eps) in f32 of rows m0..m0+block_m of x_ref [m, k] -> [block_m]."""
    rmask = (m0 + jnp.arange(block_m)) < m

    def body(i, ss):
        cmask = (i * block_k + jnp.arange(block_k)) < k
        x = load(x_ref.at[pl.ds(m0, block_m), pl.ds(i * block_k, block_k)],
                 mask=rmask[:, None] & cmask[None, :], other=0).astype(F32)
        return ss + jnp.sum(x * x, axis=1)

    ss = lax.fori_loop(0, pl.cdiv(k, block_k), body, jnp.zeros((block_m,), F32))
    return lax.rsqrt(ss / k + eps)


def _block_scales(wq, start, nmask, k0, block_n: int, block_k: int):
    """fp8: the multipliers of a [block_n, block_k] weight tile, one per 128 x 128 block, as a tile."""
    s_ref, _ = wq
    nkb = max(1, block_k // QBLOCK)
    rows = (start + jnp.arange(block_n)) // QBLOCK
    cols = k0 // QBLOCK + jnp.arange(nkb)
    idx = (jnp.broadcast_to(rows[:, None], (block_n, nkb)), jnp.broadcast_to(cols[None, :], (block_n, nkb)))
    s = load(s_ref.at[idx], mask=nmask[:, None] & (cols < s_ref.shape[1])[None, :], other=0)  # [block_n, nkb]
    if nkb == 1:
        return s
    return jnp.broadcast_to(s[:, :, None], (block_n, nkb, QBLOCK)).reshape(block_n, block_k)


def _row_scales(wq, start, nmask, block_n: int):
    """int8: the multiplier of each of the tile's output rows [block_n]."""
    return load(wq[0].at[pl.ds(start, block_n)], mask=nmask, other=0)


def project(x_ref, w_ref, w_tiles, *, m0, m: int, k: int, block_m: int, block_n: int, block_k: int,
            norm=None, wq=None):
    """f32 [block_m, block_n] accumulators of h @ W[start:start + block_n].T, one per W tile.

    x_ref [m, k]; w_ref [n, k] (HF [out, in]); w_tiles: (start row, row mask [block_n]) pairs;
    norm: None or (norm_w_ref [k], eps): h = norm_w * (x * rstd).astype(x.dtype), rstd = 1 /
    sqrt(mean(x^2) + eps) over the whole row, rounded to x.dtype as Hugging Face's RMSNorm does
    before the matmul.
    wq: None (w in the activations' dtype) or (scale_ref, fmt) of a quantized w (common.formats):
    "int8" rows are dequantized by their scale after the sum over K, "fp8" tiles by their 128 x 128
    block scales as they are loaded - in registers, never in memory.
    block_m >= DOT_MIN_M: tensor-core dot; smaller: multiply and reduce (one weight pass).
    """
    if block_m < DOT_MIN_M:
        return _project_rows(x_ref, w_ref, w_tiles, m0=m0, m=m, k=k, block_m=block_m, block_n=block_n,
                             block_k=block_k, norm=norm, wq=wq)
    rmask = (m0 + jnp.arange(block_m)) < m
    dtype = x_ref.dtype
    if norm is not None:
        norm = (norm[0], rms_rstd(x_ref, m0, m, k, block_m, block_k, norm[1]))

    def body(i, accs):
        k0 = i * block_k
        cmask = (k0 + jnp.arange(block_k)) < k
        x = load(x_ref.at[pl.ds(m0, block_m), pl.ds(k0, block_k)],
                 mask=rmask[:, None] & cmask[None, :], other=0)  # [block_m, block_k]
        if norm is not None:
            nw_ref, rstd = norm
            nw = load(nw_ref.at[pl.ds(k0, block_k)], mask=cmask, other=0).astype(dtype).astype(F32)
            h = (x.astype(F32) * rstd[:, None]).astype(dtype)
            x = (h.astype(F32) * nw[None, :]).astype(dtype)
        out = []
        for acc, (start, nmask) in zip(accs, w_tiles):
            w = load(w_ref.at[pl.ds(start, block_n), pl.ds(k0, block_k)],
                     mask=nmask[:, None] & cmask[None, :], other=0.0)  # [block_n, block_k]
            if wq is not None:  # int8 values are exact in bf16; fp8 ones scaled by their blocks first
                w = w.astype(F32) * _block_scales(wq, start, nmask, k0, block_n, block_k) if wq[1] == "fp8" else w
                w = w.astype(dtype)
            out.append(acc + dot(x, w, ((1,), (1,))))
        return tuple(out)

    init = tuple(jnp.zeros((block_m, block_n), F32) for _ in w_tiles)
    accs = lax.fori_loop(0, pl.cdiv(k, block_k), body, init)
    if wq is not None and wq[1] == "int8":
        accs = tuple(acc * _row_scales(wq, start, nmask, block_n)[None, :] for acc, (start, nmask) in zip(accs, w_tiles))
    return accs


def _project_rows(x_ref, w_ref, w_tiles, *, m0, m, k, block_m, block_n, block_k, norm, wq=None):
    """The decode form of `project`: each weight tile is loaded once and multiplied and reduced
    against each of the block_m token rows in turn (rows are separate [block_k] vectors).

    Loads are issued before any reduction (a reduction across warps is a barrier the loads after it
    wait for): the int8 row scales first, then with one chunk (k <= block_k) the weight tiles, the
    rows of x and the norm weight together, the norm statistic taken from the loaded rows - one
    round trip to memory. Longer rows take the statistic in a first pass over x. Weight tiles are
    read once per step: loaded evict-first, so the L2 keeps the activations (torch_impl's twin
    measured 1,453-1,462 against 1,429-1,440 tok/s at Qwen3-0.6B batch 1 on an H100)."""
    dtype = x_ref.dtype
    rows = range(block_m)
    ids = jnp.arange(block_m)
    valid = [m0 + r < m for r in rows]
    one_chunk = k <= block_k
    scales = [_row_scales(wq, start, nmask, block_n) for start, nmask in w_tiles] \
        if wq is not None and wq[1] == "int8" else None
    if norm is not None and not one_chunk:
        rstd = rms_rstd(x_ref, m0, m, k, block_m, block_k, norm[1])
        rstd_r = [jnp.sum(jnp.where(ids == r, rstd, 0.0)) for r in rows]  # scalars

    def body(i, accs):
        k0 = i * block_k
        cmask = (k0 + jnp.arange(block_k)) < k
        ws = []
        for start, nmask in w_tiles:
            w = load(w_ref.at[pl.ds(start, block_n), pl.ds(k0, block_k)], mask=nmask[:, None] & cmask[None, :],
                     other=0.0, eviction_policy="evict_first")  # [block_n, block_k]; read once per step
            if wq is not None and wq[1] == "fp8":
                w = w.astype(F32) * _block_scales(wq, start, nmask, k0, block_n, block_k)
            ws.append(w)
        if norm is not None:
            nw = load(norm[0].at[pl.ds(k0, block_k)], mask=cmask, other=0).astype(dtype).astype(F32)
        xs = [load(x_ref.at[m0 + r, pl.ds(k0, block_k)], mask=cmask & valid[r], other=0) for r in rows]
        for r in rows:
            x = xs[r]
            if norm is not None:
                if one_chunk:
                    xf = x.astype(F32)
                    rs = lax.rsqrt(jnp.sum(xf * xf) / k + norm[1])
                else:
                    rs = rstd_r[r]
                x = (((x.astype(F32) * rs).astype(dtype)).astype(F32) * nw).astype(dtype)
            xs[r] = x.astype(F32)[None, :]
        out = []
        for t, w in enumerate(ws):
            w = w.astype(F32)
            out += [accs[t * block_m + r] + jnp.sum(w * xs[r], axis=1) for r in rows]
        return tuple(out)

    init = tuple(jnp.zeros((block_n,), F32) for _ in range(len(w_tiles) * block_m))
    accs = lax.fori_loop(0, pl.cdiv(k, block_k), body, init)
    if scales is not None:
        accs = tuple(acc * scales[i // block_m] for i, acc in enumerate(accs))
    # [block_m, block_n] per tile, assembled without concatenation (not lowered by Triton).
    return tuple(sum(jnp.where(ids[:, None] == r, accs[t * block_m + r][None, :], 0.0) for r in rows)
                 for t in range(len(w_tiles)))
