"""o_proj + residual: out = residual + attn @ w_o.T, in one launch (also the MLP's down + residual).

Residual semantics (as transformers): the projection is rounded to the activation dtype, then
added to the residual in the activation dtype (computed in float32, rounded once).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from common.tiles import MatmulTiles
from torch_impl.kernels import _jit, tuning
from torch_impl.kernels._common import (check, check_device, check_float, check_rows, check_shape, matmul_meta,
                                        precision)


@triton.jit
def _linear_residual_kernel(
    a_ptr,  # [M, K]
    w_ptr,  # [N, K]
    r_ptr,  # [M, N]
    out_ptr,  # [M, N]
    M, N, K,
    stride_am, stride_wn, stride_rm, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
    SWAP: tl.constexpr, ONE_SHOT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc, _ = _jit.project(a_ptr, a_ptr, w_ptr, offs_n, offs_n, n_ok, offs_m, m_ok, stride_am, stride_wn, K, 0.0,
                          False, False, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, USE_DOT, PRECISION, PDL, SWAP, ONE_SHOT)
    _jit.release_next(PDL)
    mask = m_ok[:, None] & n_ok[None, :]
    r = tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0)
    y = _jit.cast(acc, r.dtype, PRECISION).to(tl.float32) + r.to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], _jit.cast(y, r.dtype, PRECISION), mask=mask)


def _launch(op: str, a: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, tiles, a_name: str, w_name: str):
    check(a.dim() == 2, f"{op}: {a_name} has shape {list(a.shape)}, expected [T, in_features]")
    check(w.dim() == 2, f"{op}: {w_name} has shape {list(w.shape)}, expected [out_features, in_features]")
    m, k = a.shape
    n = w.shape[0]
    check(w.shape[1] == k, f"{op}: {w_name} has shape {list(w.shape)}, expected [{n}, {k}] "
                           f"(in_features of {a_name} [{m}, {k}])")
    check_shape(op, "residual", residual, (m, n))
    check_float(op, **{a_name: a, w_name: w, "residual": residual})
    check_device(op, **{a_name: a, w_name: w, "residual": residual})
    check_rows(op, **{a_name: a, w_name: w, "residual": residual})
    tiles = tiles or tuning.matmul_tiles(op, a.device, m, n, k)
    check(isinstance(tiles, MatmulTiles), f"{op}: tiles={tiles!r}, expected a common.tiles.MatmulTiles")
    out = torch.empty_like(residual, memory_format=torch.contiguous_format)
    if m == 0:
        return out
    meta = matmul_meta(tiles, m, k, a.device)
    grid = (triton.cdiv(n, tiles.block_n), triton.cdiv(m, meta["BLOCK_M"]))
    _linear_residual_kernel[grid](a, w, residual, out, m, n, k, a.stride(0), w.stride(0), residual.stride(0),
                                  out.stride(0), BLOCK_N=tiles.block_n, PRECISION=precision(a.dtype), **meta)
    return out


def attn_out(attn: torch.Tensor, w_o: torch.Tensor, residual: torch.Tensor, *,
             tiles: MatmulTiles | None = None) -> torch.Tensor:
    """residual + attn @ w_o.T; attn [T, Hq*D], w_o [hidden, Hq*D], residual [T, hidden]."""
    return _launch("attn_out", attn, w_o, residual, tiles, "attn", "w_o")


def linear_residual(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, *,
                    tiles: MatmulTiles | None = None) -> torch.Tensor:
    """residual + x @ w.T (the MLP's down projection with its residual; tuned as "mlp_down")."""
    return _launch("mlp_down", x, w, residual, tiles, "x", "w")
