"""Triton device functions shared by the kernels (inlined into each kernel)."""

from __future__ import annotations

import triton
import triton.language as tl

from common import formats

try:  # programmatic dependent launch (Hopper+); absent from older Triton
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - the launchers then never set PDL
    gdc_launch_dependents = gdc_wait = None

QBLOCK: tl.constexpr = tl.constexpr(formats.get("fp8").scale_block[0])  # fp8 weights' block edge (common.formats)


# The token count M of the projection kernels varies with every prompt length: not specialized (Triton
# compiles a variant per integer argument that is 1 or a multiple of 16 otherwise), so a new prompt
# length compiles nothing; the tiles (per power-of-two token bucket) pick the kernel.
TOKEN_COUNT = ["M"]


@triton.jit
def wait_prior(PDL: tl.constexpr):
    """With programmatic dependent launch (PDL 1 or 2), block until the previous kernel's writes are
    visible. Everything before this call may only read data no earlier kernel writes (the weights)."""
    if PDL != 0:
        gdc_wait()


@triton.jit
def release_first(PDL: tl.constexpr):
    """PDL 2 (launches of one token row): let the next kernel launch now, before this one's loads,
    so its programs are placed and request their weights while this one runs (Qwen3-0.6B batch 1 on
    an H100: 1,362 against 1,228 tok/s releasing after the loads). Where the release happens changes
    no result: a kernel's `wait_prior` waits for the whole previous grid to finish."""
    if PDL == 2:
        gdc_launch_dependents()


@triton.jit
def release_after(PDL: tl.constexpr):
    """PDL 1 (tensor-core tiles, several token rows): let the next kernel launch once this one's
    loads are done (Qwen3-0.6B / 8B batch 32 on an H100: 14,308 / 3,113 tok/s, against 13,799 /
    2,960 releasing first)."""
    if PDL == 1:
        gdc_launch_dependents()


@triton.jit
def k_mask(k0, K, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """[BLOCK_K] mask of the reduction chunk starting at k0 (a constant when K % BLOCK_K == 0)."""
    if EVEN_K:
        return tl.full([BLOCK_K], 1, tl.int1)
    return (k0 + tl.arange(0, BLOCK_K)) < K


@triton.jit
def row_rstd(x_ptr, offs_m, m_ok, stride_xm, K, eps,
             BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """[BLOCK_M] float32 1 / sqrt(mean(x^2) + eps) of rows offs_m of x [M, K]."""
    offs_k = tl.arange(0, BLOCK_K)
    ss = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k_mask(k0, K, BLOCK_K, EVEN_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    return tl.rsqrt(ss / K + eps)


@triton.jit
def cast(x, dtype: tl.constexpr, PRECISION: tl.constexpr):
    """float32 x -> dtype, rounding to nearest even. Triton's interpreter (PRECISION "upcast")
    truncates float32 -> bfloat16, so there the rounding is done on the bits first."""
    if PRECISION == "upcast":
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def apply_norm(x, w, rstd, PRECISION: tl.constexpr):
    """RMSNorm of x [BM, BK] (x.dtype) in Hugging Face's order, given rstd [BM] and the weight chunk w
    [BK]: the normalized value is rounded to x.dtype, then multiplied by the weight; the product of
    two 16-bit floats is exact in float32, so rounding it once equals the 16-bit multiply (which
    Triton's interpreter cannot do)."""
    normed = cast(x.to(tl.float32) * rstd[:, None], x.dtype, PRECISION).to(tl.float32)
    return cast(normed * w.to(tl.float32)[None, :], x.dtype, PRECISION)


@triton.jit
def load_x(x_ptr, nw_ptr, offs_m, m_ok, k0, k_ok, stride_xm, rstd, NORM: tl.constexpr, BLOCK_K: tl.constexpr,
           PRECISION: tl.constexpr):
    """Chunk [BLOCK_M, BLOCK_K] of x, or of RMSNorm(x) (NORM, `apply_norm`)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                other=0.0)
    if NORM:
        x = apply_norm(x, tl.load(nw_ptr + offs_k, mask=k_ok, other=0.0), rstd, PRECISION)
    return x


@triton.jit
def load_rows(w_ptr, rows, r_ok, k0, k_ok, stride_wn, BLOCK_K: tl.constexpr):
    """Weight chunk [len(rows), BLOCK_K] of W [N, K] (the [out, in] layout: K contiguous). Read once per
    step: marked evict-first, so the L2 keeps the activations (Qwen3-0.6B batch 1 on an H100: 1,453-1,462
    against 1,429-1,440 tok/s, same run)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    return tl.load(w_ptr + rows[:, None] * stride_wn + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :],
                   other=0.0, eviction_policy="evict_first")


@triton.jit
def load_w(w_ptr, s_ptr, rows, r_ok, k0, k_ok, stride_wn, stride_sn, K, BLOCK_N: tl.constexpr,
           BLOCK_K: tl.constexpr, QUANT: tl.constexpr):
    """Weight chunk [BLOCK_N, BLOCK_K] as stored (QUANT 0: the activations' dtype; 1: int8, scaled
    after the sum over K), or dequantized to float32 by its 128 x 128 block multipliers (QUANT 2: fp8
    e4m3, common.formats) - in registers, never in memory."""
    w = load_rows(w_ptr, rows, r_ok, k0, k_ok, stride_wn, BLOCK_K)
    if QUANT == 2:
        if BLOCK_K <= QBLOCK:  # the chunk lies in one block column
            in_k = (k0 + tl.zeros([BLOCK_N], tl.int32)) < K  # the prefetch past the end reads nothing
            s = tl.load(s_ptr + (rows // QBLOCK) * stride_sn + k0 // QBLOCK, mask=r_ok & in_k, other=0.0)
            w = w.to(tl.float32) * s[:, None]
        else:
            NB: tl.constexpr = BLOCK_K // QBLOCK
            cols = k0 // QBLOCK + tl.arange(0, NB)
            s = tl.load(s_ptr + (rows // QBLOCK)[:, None] * stride_sn + cols[None, :],
                        mask=r_ok[:, None] & (cols < tl.cdiv(K, QBLOCK))[None, :], other=0.0)  # [BN, NB]
            w = tl.reshape(tl.reshape(w.to(tl.float32), [BLOCK_N, NB, QBLOCK]) * s[:, :, None], [BLOCK_N, BLOCK_K])
    return w


@triton.jit
def load_w_as(w_ptr, s_ptr, rows, r_ok, k0, k_ok, stride_wn, stride_sn, K, dtype: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QUANT: tl.constexpr, PRECISION: tl.constexpr):
    """load_w in `dtype` (a tensor-core operand beside h): int8 values are exact in 16-bit floats,
    fp8 ones times their scales rounded once."""
    w = load_w(w_ptr, s_ptr, rows, r_ok, k0, k_ok, stride_wn, stride_sn, K, BLOCK_N, BLOCK_K, QUANT)
    if QUANT != 0:
        w = cast(w.to(tl.float32), dtype, PRECISION)
    return w


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with float32 accumulation. PRECISION "upcast" (Triton's interpreter with 16-bit
    inputs, whose 16-bit dot is wrong on CPU) multiplies the same values in float32: products of
    bfloat16/float16 numbers are exact in float32, so only the summation order differs."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if PRECISION == "ieee":
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _mma(acc, h, w, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """acc [BM, BN] += h [BM, BK] @ w [BN, BK].T: a tensor-core dot (BM >= 16), or for one token row
    (BM == 1) a multiply-and-reduce over K (streams W without padding the row to 16)."""
    if USE_DOT:
        acc = dot(h, tl.trans(w), acc, PRECISION)
    else:  # one row (BM == 1): a 2-D product [BN, BK] reduced over K, no 3-D broadcast
        acc = acc + tl.sum(w.to(tl.float32) * h.to(tl.float32), axis=1)[None, :]
    return acc


@triton.jit
def request(w_ptr, s_ptr, nw_ptr, rows_a, rows_b, r_ok, stride_wn, stride_sn, K, NORM: tl.constexpr,
            TWO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
            USE_DOT: tl.constexpr, QUANT: tl.constexpr):
    """What a one-token-row projection requests before it waits for the previous kernel - none of it
    is an earlier kernel's output: (w_a, w_b, nw, sc_a, sc_b), the first weight chunk [BLOCK_N,
    BLOCK_K] of W[rows_a] (and of W[rows_b] with TWO), the norm weight's first chunk (NORM) and the
    int8 row scales (QUANT 1). The kernel then waits (`wait_prior`), loads what the previous kernels
    wrote - all of it at once, one round trip - and calls `project` with these. Tensor-core tiles
    (USE_DOT) request nothing here (Triton pipelines their loads after the wait): placeholders."""
    if USE_DOT:
        return 0.0, 0.0, 0.0, 0.0, 0.0
    else:
        k_ok = k_mask(0, K, BLOCK_K, EVEN_K)
        w_a = load_w(w_ptr, s_ptr, rows_a, r_ok, 0, k_ok, stride_wn, stride_sn, K, BLOCK_N, BLOCK_K, QUANT)
        w_b = w_a
        if TWO:
            w_b = load_w(w_ptr, s_ptr, rows_b, r_ok, 0, k_ok, stride_wn, stride_sn, K, BLOCK_N, BLOCK_K, QUANT)
        nw = 0.0
        if NORM:
            nw = tl.load(nw_ptr + tl.arange(0, BLOCK_K), mask=k_ok, other=0.0)
        sc_a = 0.0
        sc_b = 0.0
        if QUANT == 1:
            sc_a = tl.load(s_ptr + rows_a, mask=r_ok, other=0.0)
            if TWO:
                sc_b = tl.load(s_ptr + rows_b, mask=r_ok, other=0.0)
        return w_a, w_b, nw, sc_a, sc_b


@triton.jit
def project(x_ptr, nw_ptr, w_ptr, rows_a, rows_b, r_ok, offs_m, m_ok, stride_xm, stride_wn, K, eps,
            w_a, w_b, nw, sc_a, sc_b,
            NORM: tl.constexpr, TWO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
            SWAP: tl.constexpr = False, ONE_SHOT: tl.constexpr = False,
            s_ptr=None, stride_sn=0, QUANT: tl.constexpr = 0, SPLIT: tl.constexpr = 1):
    """(acc_a, acc_b) [BLOCK_M, BLOCK_N] float32 = h @ W[rows_a].T and h @ W[rows_b].T (TWO), where
    h = RMSNorm(x) (NORM) or x, for rows offs_m of x [M, K], after the kernel's wait for the previous
    one; w_a, w_b, nw, sc_a, sc_b: what `request` returned before that wait. A quantized W (QUANT 1
    int8, 2 fp8; s_ptr its scales, common.formats): int8 rows scaled after the sum over K, fp8 chunks
    as loaded. SPLIT > 1 (tensor-core tiles): the sum over this program's run of K chunks
    (`split_range`); `split_sum` adds the runs."""
    acc_a, acc_b = _project(x_ptr, nw_ptr, w_ptr, rows_a, rows_b, r_ok, offs_m, m_ok, stride_xm, stride_wn, K, eps,
                            w_a, w_b, nw, NORM, TWO, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, USE_DOT, PRECISION, SWAP,
                            ONE_SHOT, s_ptr, stride_sn, QUANT, SPLIT)
    if QUANT == 1:
        if USE_DOT:
            sc_a = tl.load(s_ptr + rows_a, mask=r_ok, other=0.0)
            if TWO:
                sc_b = tl.load(s_ptr + rows_b, mask=r_ok, other=0.0)
        acc_a = acc_a * sc_a[None, :]
        if TWO:
            acc_b = acc_b * sc_b[None, :]
    return acc_a, acc_b


@triton.jit
def _project(x_ptr, nw_ptr, w_ptr, rows_a, rows_b, r_ok, offs_m, m_ok, stride_xm, stride_wn, K, eps, w_a, w_b, nw,
             NORM: tl.constexpr, TWO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
             SWAP: tl.constexpr, ONE_SHOT: tl.constexpr, s_ptr, stride_sn, QUANT: tl.constexpr,
             SPLIT: tl.constexpr):
    """project without the int8 row scales.

    USE_DOT (16+ token rows): tensor-core dots, loads software-pipelined by Triton (num_stages).
    One token row: a multiply-and-reduce that keeps W's loads in flight: the first chunks were
    requested before the wait (`request`: the weights are no kernel's output), and each step
    requests the next chunks before reducing the current ones (register double-buffering; the last
    request is fully masked). ONE_SHOT (K <= BLOCK_K): the whole slab is in flight already; x is
    loaded once (one round trip after the wait) and its norm statistic taken from those registers.
    """
    acc_a = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if USE_DOT:  # loads pipelined by Triton (num_stages)
        if NORM:  # the whole row's statistic, whatever part of K this program sums
            rstd = row_rstd(x_ptr, offs_m, m_ok, stride_xm, K, eps, BLOCK_M, BLOCK_K, EVEN_K)
        else:
            rstd = tl.zeros([BLOCK_M], tl.float32)
        k_lo, k_hi = split_range(K, BLOCK_K, SPLIT)
        if SWAP:  # W as the left operand: [BN, BK] @ [BK, BM], BN >= 64 rows per warpgroup MMA
            t_a = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            t_b = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                k_ok = k_mask(k0, K, BLOCK_K, EVEN_K)
                h_t = tl.trans(load_x(x_ptr, nw_ptr, offs_m, m_ok, k0, k_ok, stride_xm, rstd, NORM, BLOCK_K,
                                      PRECISION))
                t_a = dot(load_w_as(w_ptr, s_ptr, rows_a, r_ok, k0, k_ok, stride_wn, stride_sn, K, h_t.dtype, BLOCK_N, BLOCK_K,
                                     QUANT, PRECISION), h_t, t_a, PRECISION)
                if TWO:
                    t_b = dot(load_w_as(w_ptr, s_ptr, rows_b, r_ok, k0, k_ok, stride_wn, stride_sn, K, h_t.dtype, BLOCK_N,
                                         BLOCK_K, QUANT, PRECISION), h_t, t_b, PRECISION)
            return tl.trans(t_a), tl.trans(t_b)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k_ok = k_mask(k0, K, BLOCK_K, EVEN_K)
            h = load_x(x_ptr, nw_ptr, offs_m, m_ok, k0, k_ok, stride_xm, rstd, NORM, BLOCK_K, PRECISION)
            acc_a = _mma(acc_a, h, load_w_as(w_ptr, s_ptr, rows_a, r_ok, k0, k_ok, stride_wn, stride_sn, K, h.dtype,
                                              BLOCK_N, BLOCK_K, QUANT, PRECISION), True, PRECISION)
            if TWO:
                acc_b = _mma(acc_b, h, load_w_as(w_ptr, s_ptr, rows_b, r_ok, k0, k_ok, stride_wn, stride_sn, K, h.dtype,
                                                  BLOCK_N, BLOCK_K, QUANT, PRECISION), True, PRECISION)
        return acc_a, acc_b
    else:  # one token row (code after a constexpr branch's return is still compiled: keep it in else)
        if ONE_SHOT:  # K <= BLOCK_K: one load of x; its statistic from the same registers
            k_ok = k_mask(0, K, BLOCK_K, EVEN_K)
            h = tl.load(x_ptr + offs_m[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if NORM:
                xf = h.to(tl.float32)
                h = apply_norm(h, nw, tl.rsqrt(tl.sum(xf * xf, axis=1) / K + eps), PRECISION)
            acc_a = _mma(acc_a, h, w_a, False, PRECISION)
            if TWO:
                acc_b = _mma(acc_b, h, w_b, False, PRECISION)
            return acc_a, acc_b
        if NORM:
            rstd = row_rstd(x_ptr, offs_m, m_ok, stride_xm, K, eps, BLOCK_M, BLOCK_K, EVEN_K)
        else:
            rstd = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            h = load_x(x_ptr, nw_ptr, offs_m, m_ok, k0, k_mask(k0, K, BLOCK_K, EVEN_K), stride_xm, rstd, NORM,
                       BLOCK_K, PRECISION)  # [BM, BK]
            nk_ok = (k0 + BLOCK_K + tl.arange(0, BLOCK_K)) < K
            n_a = load_w(w_ptr, s_ptr, rows_a, r_ok, k0 + BLOCK_K, nk_ok, stride_wn, stride_sn, K, BLOCK_N, BLOCK_K, QUANT)
            acc_a = _mma(acc_a, h, w_a, False, PRECISION)
            w_a = n_a
            if TWO:
                n_b = load_w(w_ptr, s_ptr, rows_b, r_ok, k0 + BLOCK_K, nk_ok, stride_wn, stride_sn, K, BLOCK_N, BLOCK_K,
                              QUANT)
                acc_b = _mma(acc_b, h, w_b, False, PRECISION)
                w_b = n_b
        return acc_a, acc_b


@triton.jit
def split_range(K, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
    """[k_lo, k_hi) of this program's reduction: with SPLIT > 1, program_id(2)'s contiguous run of
    ceil(chunks / SPLIT) chunks of BLOCK_K (the last runs may be shorter or empty), else all of K."""
    if SPLIT == 1:
        return 0, K
    run = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT) * BLOCK_K
    k_lo = tl.program_id(2) * run
    return k_lo, tl.minimum(K, k_lo + run)


@triton.jit
def split_sum(acc_a, acc_b, TWO: tl.constexpr, ws_ptr, cnt_ptr, rows_a, rows_b, r_ok, offs_m, m_ok,
              stride_ws, stride_wm, SPLIT: tl.constexpr):
    """split_k's finish: this program's partial sums (acc_a, acc_b [BLOCK_M, BLOCK_N], columns W's
    rows_a / rows_b) go to the float32 workspace ws [SPLIT, M, rows] at program_id(2); the last of
    the tile's SPLIT programs to arrive (counted in cnt[tile], tile = the program's place in grid
    axes 0 and 1) adds all parts in split order - the same sum whichever program is last - and
    resets the counter. Returns (acc_a, acc_b, m_ok): m_ok all false but in the last program, so
    the epilogue, masked by it, stores (and loads) nothing elsewhere."""
    tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    mask = m_ok[:, None] & r_ok[None, :]
    ws_a = ws_ptr + offs_m[:, None] * stride_wm + rows_a[None, :]
    ws_b = ws_ptr + offs_m[:, None] * stride_wm + rows_b[None, :]
    tl.store(ws_a + tl.program_id(2) * stride_ws, acc_a, mask=mask)
    if TWO:
        tl.store(ws_b + tl.program_id(2) * stride_ws, acc_b, mask=mask)
    tl.debug_barrier()  # every thread's partials are stored before the release below
    arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    last = arrived == SPLIT - 1
    mine = tl.where(last, mask, False)  # the others load nothing
    acc_a = tl.zeros_like(acc_a)
    acc_b = tl.zeros_like(acc_b)
    for s in tl.static_range(SPLIT):
        acc_a += tl.load(ws_a + s * stride_ws, mask=mine, other=0.0, cache_modifier=".cg")
        if TWO:
            acc_b += tl.load(ws_b + s * stride_ws, mask=mine, other=0.0, cache_modifier=".cg")
    tl.atomic_xchg(cnt_ptr + tile, 0, mask=last)
    return acc_a, acc_b, tl.where(last, m_ok, False)
