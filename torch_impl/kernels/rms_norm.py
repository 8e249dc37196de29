"""RMSNorm of whole rows in one launch (the model's final norm): weight * (x * rsqrt(mean(x^2) + eps)),
Hugging Face's rounding order (normalized value rounded to x.dtype, then times the weight)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from common.tiles import next_pow2
from torch_impl.kernels import _jit
from torch_impl.kernels._lib import check, check_device, check_float, check_rows, check_shape, pdl_meta, precision


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [M, N]
    w_ptr,  # [N]
    out_ptr,  # [M, N]
    N, stride_xm, stride_om, eps,
    BLOCK: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    _jit.release_first(PDL)  # PDL 2: the next kernel launches and streams its weights meanwhile
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)  # a weight: no kernel writes it
    _jit.wait_prior(PDL)
    x = tl.load(x_ptr + row * stride_xm + offs, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    normed = _jit.cast(x * rstd, out_ptr.dtype.element_ty, PRECISION).to(tl.float32)
    _jit.release_after(PDL)  # PDL 1: the loads are done
    tl.store(out_ptr + row * stride_om + offs, _jit.cast(normed * w, out_ptr.dtype.element_ty, PRECISION), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float) -> torch.Tensor:
    """x [M, N] -> RMSNorm(x) [M, N] in x.dtype."""
    op = "rms_norm"
    check(x.dim() == 2, f"{op}: x has shape {list(x.shape)}, expected [T, hidden]")
    m, n = x.shape
    check_shape(op, "weight", weight, (n,))
    check_float(op, x=x, weight=weight)
    check_device(op, x=x, weight=weight)
    check_rows(op, x=x, weight=weight)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m:
        block = next_pow2(n)
        _rms_norm_kernel[(m,)](x, weight, out, n, x.stride(0), out.stride(0), float(eps), BLOCK=block,
                               PRECISION=precision(x.dtype), num_warps=4 if block <= 2048 else 8,
                               **pdl_meta(x.device, early=m == 1))
    return out
