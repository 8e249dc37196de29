"""What the Pallas kernels share: the backend choice, interpreter mode, and the projection loop.

The one place that picks the Pallas backend: every kernel goes through `pallas_call` below,
which passes `pltriton.CompilerParams` (the Triton lowering; without it jax >= 0.9 sends a
GPU pallas_call to Mosaic GPU). jax 0.11 deprecates the Triton backend with a warning at
lowering time; only the names used here must exist in both jax 0.10.2 (CPU, CI) and 0.11.2
(the GPU): `pltriton.load/store` with mask and `other`, `pl.program_id`, `pl.ds`, `pl.cdiv`,
`lax.fori_loop`, `jax.lax.dot_general(preferred_element_type=f32)`.

Kernels take whole arrays as refs (no BlockSpecs) and address them with `pl.ds` windows and
masked loads/stores, so array sizes need not be powers of two; every loaded or stored window is.
Sizes reach the kernels as static Python ints, never `pl.num_programs()` (jax issue 40847).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

F32 = jnp.float32
# Tiles with block_m >= DOT_MIN_M use the tensor-core dot; smaller ones multiply and reduce
# (decode GEMV: the token is not padded to 16 rows, the weights stream at the copy bandwidth).
DOT_MIN_M = 16
load = pltriton.load
store = pltriton.store


def use_interpret(interpret: bool | None = None) -> bool:
    """Interpreter mode: as asked, else automatically when the default backend is not a GPU."""
    if interpret is not None:
        return bool(interpret)
    return jax.default_backend() != "gpu"


def pallas_call(kernel, *, name: str, grid: tuple[int, ...], out_shape, num_warps: int, num_stages: int,
                interpret: bool | None = None, input_output_aliases: dict[int, int] | None = None):
    """pl.pallas_call on whole-array refs through the Triton lowering (the one backend choice)."""
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, name=name,
        input_output_aliases=input_output_aliases or {},
        interpret=use_interpret(interpret),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
    )


def check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def check_shape(name: str, x, shape: tuple) -> None:
    check(tuple(x.shape) == tuple(shape), f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")


def check_float(name: str, x, dtype=None) -> None:
    check(jnp.issubdtype(x.dtype, jnp.floating), f"{name}: expected a float array, got {x.dtype}")
    if dtype is not None:
        check(x.dtype == dtype, f"{name}: dtype {x.dtype} must match the activations' {jnp.dtype(dtype)}")


def check_int(name: str, x) -> None:
    check(x.dtype == jnp.int32, f"{name}: expected int32, got {x.dtype}")


# ----- kernel-side helpers --------------------------------------------------------------------

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


def project(x_ref, w_ref, w_tiles, *, m0, m: int, k: int, block_m: int, block_n: int, block_k: int,
            norm=None):
    """f32 [block_m, block_n] accumulators of h @ W[start:start + block_n].T, one per W tile.

    x_ref [m, k]; w_ref [n, k] (HF [out, in]); w_tiles: (start row, row mask [block_n]) pairs;
    norm: None or (norm_w_ref [k], rstd [block_m]): h = norm_w * (x * rstd).astype(x.dtype),
    rounded to x.dtype as Hugging Face's RMSNorm does before the matmul.
    block_m >= DOT_MIN_M: tensor-core dot; smaller: multiply and reduce (one weight pass).
    """
    rmask = (m0 + jnp.arange(block_m)) < m
    dtype = x_ref.dtype

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
                     mask=nmask[:, None] & cmask[None, :], other=0)  # [block_n, block_k]
            if block_m >= DOT_MIN_M:
                acc = acc + lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=F32)
            elif block_m == 1:
                acc = acc + jnp.sum(w.astype(F32) * x.astype(F32), axis=1)[None, :]
            else:
                acc = acc + jnp.sum(w.astype(F32)[None, :, :] * x.astype(F32)[:, None, :], axis=2)
            out.append(acc)
        return tuple(out)

    init = tuple(jnp.zeros((block_m, block_n), F32) for _ in w_tiles)
    return lax.fori_loop(0, pl.cdiv(k, block_k), body, init)
