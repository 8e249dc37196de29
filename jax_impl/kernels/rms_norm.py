"""The final norm in Pallas (Triton): RMSNorm(x) [T, hidden], one program per token row.

Hugging Face's order: x normalized in float32, rounded to x.dtype, then multiplied by the weight
(rounded to x.dtype). jax_impl's default rule keeps the plain XLA op, which XLA fuses into the
head's product; the kernel is the twin of torch_impl's and runs where a table asks for it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from common.tiles import next_pow2
from jax_impl.kernels._jit import F32, load, store
from jax_impl.kernels._lib import check, check_float, check_shape, pallas_call


def _rms_norm_kernel(x_ref,   # [m, n]
                     w_ref,   # [n]
                     o_ref,   # [m, n]
                     *, n: int, block: int, eps: float):
    row = pl.program_id(0)
    cols = jnp.arange(block)
    mask = cols < n
    x = load(x_ref.at[row, pl.ds(0, block)], mask=mask, other=0).astype(F32)
    rstd = lax.rsqrt(jnp.sum(x * x) / n + eps)
    w = load(w_ref.at[pl.ds(0, block)], mask=mask, other=0).astype(o_ref.dtype).astype(F32)
    normed = (x * rstd).astype(o_ref.dtype).astype(F32)
    store(o_ref.at[row, pl.ds(0, block)], (normed * w).astype(o_ref.dtype), mask=mask)


def rms_norm(x, weight, *, eps: float, interpret: bool | None = None):
    """x [T, hidden] -> RMSNorm(x) [T, hidden] in x.dtype."""
    op = "rms_norm"
    check(x.ndim == 2, f"{op}: x: expected [T, hidden], got shape {x.shape}")
    m, n = x.shape
    check_shape(f"{op}: weight", weight, (n,))
    check_float(f"{op}: x", x)
    check_float(f"{op}: weight", weight)
    if m == 0:
        return jnp.zeros_like(x)
    block = next_pow2(n)
    kernel = functools.partial(_rms_norm_kernel, n=n, block=block, eps=float(eps))
    return pallas_call(kernel, name=op, grid=(m,), out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                         num_warps=4 if block <= 2048 else 8, num_stages=1, interpret=interpret)(x, weight)
