"""linear_residual: out = residual + x @ w.T in one Pallas (Triton) kernel (o_proj; the MLP's down
projection, see mlp.py). residual None adds nothing (a row-parallel shard whose residual another
rank adds).
Grid (cdiv(T, block_m), cdiv(N, block_n)); each program streams W[block_n, K] in block_k
chunks. Decode (block_m < 16) multiplies and reduces without tensor cores; prefill-sized
inputs (block_m >= 16) use the tiled dot. Accumulation in float32, one rounding at the end.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from common.tiles import MatmulTiles
from jax_impl.kernels._jit import DOT_MIN_M, F32, load, project, store
from jax_impl.kernels._lib import check, check_float, check_shape, pallas_call, split_weight, tiles_for


def _linear_residual_kernel(x_ref,    # [m, k]
                            w_ref,    # [n, k]
                            *refs,    # [s_ref: w's scales, when quantized], [r_ref [m, n]], o_ref [m, n]
                            m: int, n: int, k: int, block_m: int, block_n: int, block_k: int, fmt: str | None,
                            residual: bool):
    refs = list(refs)
    wq = (refs.pop(0), fmt) if fmt else None
    r_ref = refs.pop(0) if residual else None
    o_ref = refs[0]
    m0 = pl.program_id(0) * block_m
    n0 = pl.program_id(1) * block_n
    nmask = (n0 + jnp.arange(block_n)) < n
    mask = ((m0 + jnp.arange(block_m)) < m)[:, None] & nmask[None, :]
    window = (pl.ds(m0, block_m), pl.ds(n0, block_n))
    early = r_ref is not None and block_m < DOT_MIN_M  # decode: the residual with the other loads, one round trip
    r = load(r_ref.at[window], mask=mask, other=0) if early else None
    (acc,) = project(x_ref, w_ref, [(n0, nmask)], m0=m0, m=m, k=k,
                       block_m=block_m, block_n=block_n, block_k=block_k, wq=wq)
    if r_ref is None:
        store(o_ref.at[window], acc.astype(o_ref.dtype), mask=mask)
        return
    r = (r if early else load(r_ref.at[window], mask=mask, other=0)).astype(F32)
    store(o_ref.at[window], (r + acc).astype(o_ref.dtype), mask=mask)


def linear_residual(x, w, residual, *, tiles: MatmulTiles | None = None, interpret: bool | None = None):
    """residual + x @ w.T (residual None: x @ w.T); x [T, K], w [N, K] (or a quantized QWeight),
    residual [T, N]; x's dtype."""
    return project_residual(x, w, residual, tiles=tiles, interpret=interpret, name="linear_residual")


def project_residual(x, w, residual, *, tiles: MatmulTiles | None, interpret: bool | None, name: str):
    """linear_residual under another name (errors and the profile's kernel name; mlp: "mlp_down")."""
    check_float(f"{name}: x", x)
    w, scales, fmt = split_weight(f"{name}: w", w, x.dtype)
    check(x.ndim == 2 and w.ndim == 2, f"{name}: expected x [T, K] and w [N, K], got {x.shape} and {w.shape}")
    m, k = x.shape
    n = w.shape[0]
    check(w.shape[1] == k, f"{name}: w has {w.shape[1]} input features, x has {k}")
    if residual is not None:
        check_shape(f"{name}: residual", residual, (m, n))
        check_float(f"{name}: residual", residual, x.dtype)
    t = tiles_for("linear_residual", name, tiles, MatmulTiles, x.dtype, fmt, m=m, n=n, k=k)
    kernel = functools.partial(_linear_residual_kernel, m=m, n=n, k=k, block_m=t.block_m,
                               block_n=t.block_n, block_k=t.block_k, fmt=fmt, residual=residual is not None)
    return pallas_call(kernel, name=name, grid=(pl.cdiv(m, t.block_m), pl.cdiv(n, t.block_n)),
                         out_shape=jax.ShapeDtypeStruct((m, n), x.dtype), num_warps=t.num_warps,
                         num_stages=t.num_stages, interpret=interpret)(
        x, w, *scales, *([] if residual is None else [residual]))
