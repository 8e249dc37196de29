"""Qwen3's MLP block: residual + down(silu(gate) * up), [gate | up] = RMSNorm(x) @ w_gate_up.T.

Two launches: the first fuses RMSNorm, the packed gate/up projection and silu(gate) * up (each
program owns matching rows of gate and up, so the activation is formed in registers and
rounded once); the second is linear_residual's kernel on w_down (residual None adds nothing). One launch
would need every program's activations before any down-projection row can finish (a grid-wide
dependency); it is not implemented. silu(gate) * up is computed in float32 from the float32
accumulators and rounded once to the activation dtype.
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
from torch_impl.kernels.linear_residual import linear_residual


@triton.jit(do_not_specialize=_jit.TOKEN_COUNT)
def _norm_gate_up_kernel(
    x_ptr,  # [M, K]
    nw_ptr,  # [K]
    w_ptr,  # [2 I, K]: rows [gate; up]
    s_ptr,  # w's scales when quantized (QUANT 1: [2 I]; 2: [2 I/128, K/128])
    act_ptr,  # [M, I]
    ws_ptr, cnt_ptr,  # split_k (SPLIT > 1): float32 partial sums [SPLIT, M, 2 I], the tiles' arrival counters
    M, I, K,
    stride_xm, stride_wn, stride_sn, stride_am, stride_ws, stride_wm,
    eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
    SWAP: tl.constexpr, ONE_SHOT: tl.constexpr, QUANT: tl.constexpr, SPLIT: tl.constexpr,
):
    _jit.release_first(PDL)  # PDL 2: the next kernel launches and streams its weights meanwhile
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BM]; 64-bit: rows * stride can pass 2^31
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] rows of gate; up rows are I + offs_n
    m_ok = offs_m < M
    n_ok = offs_n < I
    w_g, w_u, nw, sc_g, sc_u = _jit.request(w_ptr, s_ptr, nw_ptr, offs_n, I + offs_n, n_ok, stride_wn, stride_sn, K,
                                            True, True, BLOCK_N, BLOCK_K, EVEN_K, USE_DOT, QUANT)
    _jit.wait_prior(PDL)
    acc_g, acc_u = _jit.project(x_ptr, nw_ptr, w_ptr, offs_n, I + offs_n, n_ok, offs_m, m_ok, stride_xm, stride_wn,
                                K, eps, w_g, w_u, nw, sc_g, sc_u, True, True, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                                USE_DOT, PRECISION, SWAP, ONE_SHOT, s_ptr, stride_sn, QUANT, SPLIT)
    _jit.release_after(PDL)  # PDL 1: the loads are done
    if SPLIT > 1:  # the tile's last program to finish stores it
        acc_g, acc_u, m_ok = _jit.split_sum(acc_g, acc_u, True, ws_ptr, cnt_ptr, offs_n, I + offs_n, n_ok, offs_m,
                                            m_ok, stride_ws, stride_wm, SPLIT)
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(act_ptr + offs_m[:, None] * stride_am + offs_n[None, :],
             _jit.cast(act, act_ptr.dtype.element_ty, PRECISION), mask=m_ok[:, None] & n_ok[None, :])


def norm_gate_up(x: torch.Tensor, norm_w: torch.Tensor, w_gate_up, *, eps: float,
                 tiles: MatmulTiles | None = None) -> torch.Tensor:
    """silu(gate) * up of RMSNorm(x): x [T, hidden], w_gate_up [2I, hidden] (or a QWeight) -> [T, I]."""
    op = "mlp"
    check(x.dim() == 2, f"{op}: x has shape {list(x.shape)}, expected [T, hidden]")
    check_float(op, x=x)
    w_gate_up, scale, stride_sn, fmt = split_weight(op, "w_gate_up", w_gate_up, x.dtype)
    m, k = x.shape
    check(w_gate_up.dim() == 2 and w_gate_up.shape[1] == k and w_gate_up.shape[0] % 2 == 0,
          f"{op}: w_gate_up has shape {list(w_gate_up.shape)}, expected [2 * intermediate, {k}] (rows [gate; up])")
    check_shape(op, "norm_w", norm_w, (k,))
    check_float(op, x=x, norm_w=norm_w)
    check_device(op, x=x, norm_w=norm_w, w_gate_up=w_gate_up)
    check_rows(op, x=x, norm_w=norm_w, w_gate_up=w_gate_up)
    inter = w_gate_up.shape[0] // 2
    block = formats.get(fmt).row_block
    check(inter % block == 0,
          f"{op}: a {fmt} w_gate_up needs an intermediate size that is a multiple of {block}, got {inter}")
    tiles = tiles_for("mlp_gate_up", op, tiles, MatmulTiles, x.device, x.dtype, fmt, m=m, n=2 * inter, k=k)
    act = torch.empty((m, inter), dtype=x.dtype, device=x.device)
    if m == 0:
        return act
    meta = matmul_meta(tiles, m, k, x.device)
    grid = (triton.cdiv(inter, tiles.block_n), triton.cdiv(m, meta["BLOCK_M"]), meta["SPLIT"])
    ws, cnt, stride_ws, stride_wm = split_buffers(op, meta, m, 2 * inter, grid[0], x)
    _norm_gate_up_kernel[grid](x, norm_w, w_gate_up, scale, act, ws, cnt, m, inter, k, x.stride(0),
                               w_gate_up.stride(0), stride_sn, act.stride(0), stride_ws, stride_wm, float(eps),
                               BLOCK_N=tiles.block_n,
                               PRECISION=precision(x.dtype), QUANT=formats.get(fmt).code, **meta)
    return act


def mlp(x: torch.Tensor, norm_w: torch.Tensor, w_gate_up, w_down,
        residual: torch.Tensor | None, *, eps: float, tiles: MatmulTiles | None = None,
        down_tiles: MatmulTiles | None = None) -> torch.Tensor:
    """residual + down(silu(gate) * up) of RMSNorm(x); w_gate_up [2I, hidden] rows [gate; up],
    w_down [hidden, I]; residual [T, hidden] or None (in a decoder layer: x itself).

    `tiles` applies to the gate/up launch, `down_tiles` to the down launch (each defaults per shape).
    """
    act = norm_gate_up(x, norm_w, w_gate_up, eps=eps, tiles=tiles)
    check(len(w_down.shape) == 2 and tuple(w_down.shape) == (x.shape[1], act.shape[1]),
          f"mlp: w_down has shape {list(w_down.shape)}, expected [{x.shape[1]}, {act.shape[1]}]")
    return linear_residual(act, w_down, residual, tiles=down_tiles)
