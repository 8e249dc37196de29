"""Qwen3's MLP block, residual + down(silu(gate) * up) of RMSNorm(x), in two Pallas (Triton) kernels.

Kernel 1 (`_norm_gate_up_kernel`): RMSNorm(x) (rounded to x.dtype before the matmul, as
Hugging Face does), the gate and up projections of the same block_n output features
(w_gate_up rows [gate; up]), and silu(gate) * up in float32, written as the [T, I] activation
in x.dtype. Every program recomputes the row norms of x (tiny at decode) before streaming its
weight tiles. Kernel 2 is linear_residual's kernel on w_down (residual None adds nothing). One kernel for the
whole block would need a cross-program reduction over I for the down projection; the split
after SiLU costs one small [T, I] round trip through memory instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from common import formats
from common.tiles import MatmulTiles
from jax_impl.kernels._jit import project, store
from jax_impl.kernels._lib import check, check_float, check_shape, pallas_call, split_weight, tiles_for
from jax_impl.kernels.linear_residual import project_residual


def _norm_gate_up_kernel(x_ref,     # [m, k]
                         nw_ref,    # [k]
                         w_ref,     # [2 * inter, k]  rows [gate; up]
                         *refs,     # [s_ref: w's scales, when quantized], o_ref [m, inter]
                         m: int, k: int, inter: int, eps: float, block_m: int, block_n: int, block_k: int,
                         fmt: str | None):
    wq = (refs[0], fmt) if fmt else None
    o_ref = refs[-1]
    m0 = pl.program_id(0) * block_m
    n0 = pl.program_id(1) * block_n
    nmask = (n0 + jnp.arange(block_n)) < inter
    gate, up = project(x_ref, w_ref, [(n0, nmask), (inter + n0, nmask)], m0=m0, m=m, k=k,
                         block_m=block_m, block_n=block_n, block_k=block_k, norm=(nw_ref, eps), wq=wq)
    act = gate / (1.0 + jnp.exp(-gate)) * up  # silu(gate) * up, f32
    mask = ((m0 + jnp.arange(block_m)) < m)[:, None] & nmask[None, :]
    store(o_ref.at[pl.ds(m0, block_m), pl.ds(n0, block_n)], act.astype(o_ref.dtype), mask=mask)


def norm_gate_up(x, norm_w, w_gate_up, *, eps: float, tiles: MatmulTiles | None = None,
                 interpret: bool | None = None):
    """silu(g) * u with [g | u] = RMSNorm(x) @ w_gate_up.T; x [T, hidden] -> [T, I] in x.dtype."""
    check(x.ndim == 2, f"mlp: x: expected [T, hidden], got shape {x.shape}")
    m, k = x.shape
    check_float("mlp: x", x)
    w_gate_up, scales, fmt = split_weight("mlp: w_gate_up", w_gate_up, x.dtype)
    check(w_gate_up.ndim == 2 and w_gate_up.shape[1] == k and w_gate_up.shape[0] % 2 == 0,
            f"mlp: w_gate_up: expected [2 * intermediate, {k}], got {w_gate_up.shape}")
    inter = w_gate_up.shape[0] // 2
    block = formats.get(fmt).row_block
    check(inter % block == 0,
            f"mlp: a {fmt} w_gate_up needs an intermediate size that is a multiple of {block}, got {inter}")
    check_shape("mlp: norm_w", norm_w, (k,))
    check_float("mlp: norm_w", norm_w)
    t = tiles_for("mlp_gate_up", "mlp", tiles, MatmulTiles, x.dtype, fmt, m=m, n=2 * inter, k=k)
    kernel = functools.partial(_norm_gate_up_kernel, m=m, k=k, inter=inter, eps=float(eps),
                               block_m=t.block_m, block_n=t.block_n, block_k=t.block_k, fmt=fmt)
    return pallas_call(kernel, name="mlp_norm_gate_up",
                         grid=(pl.cdiv(m, t.block_m), pl.cdiv(inter, t.block_n)),
                         out_shape=jax.ShapeDtypeStruct((m, inter), x.dtype), num_warps=t.num_warps,
                         num_stages=t.num_stages, interpret=interpret)(x, norm_w, w_gate_up, *scales)


def mlp(x, norm_w, w_gate_up, w_down, residual, *, eps: float, tiles: MatmulTiles | None = None,
        down_tiles: MatmulTiles | None = None, interpret: bool | None = None):
    """residual + down(silu(g) * u), [g | u] = RMSNorm(x) @ w_gate_up.T; x [T, hidden], w_down
    [hidden, I], residual [T, hidden] or None (in a decoder layer: x itself).

    tiles: of the gate/up kernel; down_tiles: of the down projection (each: common.tiles' choice).
    """
    act = norm_gate_up(x, norm_w, w_gate_up, eps=eps, tiles=tiles, interpret=interpret)
    check(len(w_down.shape) == 2 and tuple(w_down.shape) == (x.shape[1], act.shape[1]),
            f"mlp: w_down: expected [{x.shape[1]}, {act.shape[1]}], got {w_down.shape}")
    return project_residual(act, w_down, residual, tiles=down_tiles, interpret=interpret, name="mlp_down")
