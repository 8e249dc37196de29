"""linear_residual: out = residual + x @ w.T in one launch (o_proj, and the MLP's down projection).

residual None adds nothing (a row-parallel shard whose residual another rank adds). Residual
semantics (as transformers): the projection is rounded to the activation dtype, then added to
the residual in the activation dtype (computed in float32, rounded once).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from common import formats
from common.tiles import MatmulTiles
from torch_impl.kernels import _jit
from torch_impl.kernels._lib import (check, check_device, check_float, check_rows, check_shape,
                                     matmul_meta, precision, split_buffers, split_weight, tiles_for)


@triton.jit(do_not_specialize=_jit.TOKEN_COUNT)
def _linear_residual_kernel(
    a_ptr,  # [M, K]
    w_ptr,  # [N, K]
    s_ptr,  # w's scales when quantized (QUANT 1: [N]; 2: [N/128, K/128])
    r_ptr,  # [M, N]
    out_ptr,  # [M, N]
    ws_ptr, cnt_ptr,  # split_k (SPLIT > 1): float32 partial sums [SPLIT, M, N], the tiles' arrival counters
    M, N, K,
    stride_am, stride_wn, stride_sn, stride_rm, stride_om, stride_ws, stride_wm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
    SWAP: tl.constexpr, ONE_SHOT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, QUANT: tl.constexpr,
    SPLIT: tl.constexpr,
):
    _jit.release_first(PDL)  # PDL 2: the next kernel launches and streams its weights meanwhile
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BM]; 64-bit: rows * stride can pass 2^31
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    m_ok = offs_m < M
    n_ok = offs_n < N
    w_a, _, _, sc, _ = _jit.request(w_ptr, s_ptr, a_ptr, offs_n, offs_n, n_ok, stride_wn, stride_sn, K, False, False,
                                    BLOCK_N, BLOCK_K, EVEN_K, USE_DOT, QUANT)
    _jit.wait_prior(PDL)
    r_ptrs = r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :]
    if HAS_RESIDUAL and not USE_DOT:  # one token: the residual with x, one round trip after the wait
        r = tl.load(r_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
    acc, _ = _jit.project(a_ptr, a_ptr, w_ptr, offs_n, offs_n, n_ok, offs_m, m_ok, stride_am, stride_wn, K, 0.0,
                          w_a, w_a, 0.0, sc, sc, False, False, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, USE_DOT, PRECISION,
                          SWAP, ONE_SHOT, s_ptr, stride_sn, QUANT, SPLIT)
    _jit.release_after(PDL)  # PDL 1: the loads are done
    if SPLIT > 1:  # the tile's last program to finish stores it
        acc, _, m_ok = _jit.split_sum(acc, acc, False, ws_ptr, cnt_ptr, offs_n, offs_n, n_ok, offs_m, m_ok,
                                      stride_ws, stride_wm, SPLIT)
    mask = m_ok[:, None] & n_ok[None, :]
    dtype = out_ptr.dtype.element_ty
    if HAS_RESIDUAL:
        if USE_DOT:  # tensor-core tiles: after the loop (fewer live registers; the last split program's rows)
            r = tl.load(r_ptrs, mask=mask, other=0.0)
        y = _jit.cast(_jit.cast(acc, dtype, PRECISION).to(tl.float32) + r.to(tl.float32), dtype, PRECISION)
    else:
        y = _jit.cast(acc, dtype, PRECISION)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y, mask=mask)


def linear_residual(x: torch.Tensor, w, residual: torch.Tensor | None, *,
                    tiles: MatmulTiles | None = None) -> torch.Tensor:
    """residual + x @ w.T (residual None: x @ w.T); x [T, K], w [N, K] (or a quantized
    common.formats.QWeight), residual [T, N]; x's dtype."""
    op = "linear_residual"
    check(x.dim() == 2, f"{op}: x has shape {list(x.shape)}, expected [T, in_features]")
    check_float(op, x=x)
    w, scale, stride_sn, fmt = split_weight(op, "w", w, x.dtype)
    check(w.dim() == 2, f"{op}: w has shape {list(w.shape)}, expected [out_features, in_features]")
    m, k = x.shape
    n = w.shape[0]
    check(w.shape[1] == k, f"{op}: w has shape {list(w.shape)}, expected [{n}, {k}] (in_features of x [{m}, {k}])")
    tensors = {"x": x, "w": w} | ({} if residual is None else {"residual": residual})
    if residual is not None:
        check_shape(op, "residual", residual, (m, n))
        check_float(op, x.dtype, residual=residual)
    check_device(op, **tensors)
    check_rows(op, **tensors)
    tiles = tiles_for(op, op, tiles, MatmulTiles, x.device, x.dtype, fmt, m=m, n=n, k=k)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    meta = matmul_meta(tiles, m, k, x.device)
    grid = (triton.cdiv(n, tiles.block_n), triton.cdiv(m, meta["BLOCK_M"]), meta["SPLIT"])
    ws, cnt, stride_ws, stride_wm = split_buffers(op, meta, m, n, grid[0], x)
    r = out if residual is None else residual
    _linear_residual_kernel[grid](x, w, scale, r, out, ws, cnt, m, n, k, x.stride(0), w.stride(0), stride_sn,
                                  r.stride(0), out.stride(0), stride_ws, stride_wm, BLOCK_N=tiles.block_n,
                                  PRECISION=precision(x.dtype),
                                  HAS_RESIDUAL=residual is not None, QUANT=formats.get(fmt).code, **meta)
    return out
