"""A whole decoder layer at batch 1 in one launch: its stages as tasks of one grid of resident programs.

Stages, each built from the per-op kernels' device functions (`_jit.request` / `_jit.project`, the
q/k epilogue of rmsnorm_qkv, decode attention's `attend_range`), in the per-op path's rounding:
  0 qkv: a task per q, k and v head - RMSNorm(x) (each task takes the statistic itself), the head's
    rows of w_qkv, q/k-norm and RoPE; q into a scratch row, k and v into the caches at the step's slot;
  1 attention: a task per kv head and split - its query heads over the split's share of the keys
    (flash-decoding: the last split of a kv head to finish merges the others' partials);
  2 o_proj + residual: a task per `block_n` hidden rows - xm = x + attn @ w_o.T;
  3 gate/up: a task per `block_n` intermediate rows - act = silu(gate) * up of RMSNorm(xm);
  4 down + residual: a task per `block_n` hidden rows - out = xm + act @ w_down.T.

Scheduling. The launch has P programs, never more than can be resident at once (`resident_programs`).
Each takes an arrival ticket (an atomic add on the layer state's counter 0): its rank `me` = ticket % P,
and the launch's number L = ticket // P. It runs the tasks at places me, me + P, me + 2P, ... of the
stage-ordered task list (place p holds task p, or with an `order` - a stress test's - task order[p],
a task of the same stage). A task of stage s > 0 first requests its weights (and norm weights), then waits until
stage s - 1's done counter reaches (L + 1) * tasks(s - 1), then loads what the launch wrote, computes,
stores and adds one to stage s's done counter (release). Every task a program waits for is held by a
running program that finished all its earlier tasks: the order cannot deadlock. Counters are int64
and only grow, so no launch resets anything (a decode step stays one CUDA-graph replay); a layer state
serves one grid size. MAX_SPIN > 0 bounds each wait: past it the wait gives up, sets the state's
error flag and the task goes on with what it sees - the host raises on the flag (`check_state`).

Triton 3.6 has no atomic_load / atomic_poll: a wait reads with `atomic_add(p, 0, sem="acquire")`.
Data another program of the launch wrote is read after such an acquire, at gpu scope.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

from common import formats
from common.tiles import LayerTiles, next_pow2
from torch_impl.kernels import _jit
from torch_impl.kernels._lib import (check, check_device, check_float, interpreting, precision, split_weight,
                                     tiles_for)
from torch_impl.kernels.decode_attention import MIN_SPLIT_BLOCKS, attend_range, merge_splits, park_split, split_keys
from torch_impl.kernels.rmsnorm_qkv import _finish_head, _head_inputs

STAGES = 5


@triton.jit
def now(dummy, TIMERS: tl.constexpr):
    """The GPU's global nanosecond timer with TIMERS (inline PTX: not in Triton's interpreter), else 0.
    `dummy`: any int32 scalar (gives the result its shape)."""
    if TIMERS:
        return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dummy], dtype=tl.int64,
                                         is_pure=False, pack=1)
    else:
        return tl.zeros([], tl.int64)


@triton.jit
def wait_count(cnt_ptr, target, err_ptr, MAX_SPIN: tl.constexpr, TIMERS: tl.constexpr = False):
    """Spin until the int64 counter at cnt_ptr reaches `target` (acquire, gpu scope). MAX_SPIN > 0:
    give up after that many reads and set the error flag instead of hanging. Returns the time the
    wait ended (`now`)."""
    seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
    if MAX_SPIN > 0:
        spins = 0
        while (seen < target) & (spins < MAX_SPIN):
            seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
            spins += 1
        if seen < target:
            tl.atomic_xchg(err_ptr, 1)
    else:
        while seen < target:
            seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
    return now(target.to(tl.int32), TIMERS)


@triton.jit
def arrive(cnt_ptr):
    """One more finished task: every thread's stores before the release."""
    tl.debug_barrier()
    tl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _qkv_task(head, x_ptr, nw_ptr, w_ptr, s_ptr, qn_ptr, kn_ptr, cs_ptr, pos, slot, s_ok, q_ptr, kc_ptr, vc_ptr,
              stride_sn, stride_cs, stride_cslot, stride_ch, eps, H: tl.constexpr,
              HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, BLOCK_K: tl.constexpr,
              EVEN_K: tl.constexpr, PRECISION: tl.constexpr, QUANT: tl.constexpr):
    offs_c = tl.arange(0, HALF)
    c_ok = offs_c < HALF
    rows_lo = head * D + offs_c
    offs_m = tl.arange(0, 1).to(tl.int64)
    m_ok = offs_m < 1
    w_lo, w_hi, nw, sc_lo, sc_hi = _jit.request(w_ptr, s_ptr, nw_ptr, rows_lo, rows_lo + HALF, c_ok, H, stride_sn,
                                                H, True, True, HALF, BLOCK_K, EVEN_K, False, QUANT)
    acc_lo, acc_hi = _jit.project(x_ptr, nw_ptr, w_ptr, rows_lo, rows_lo + HALF, c_ok, offs_m, m_ok, H, H, H, eps,
                                  w_lo, w_hi, nw, sc_lo, sc_hi, True, True, 1, HALF, BLOCK_K, EVEN_K, False, PRECISION,
                                  False, H <= BLOCK_K, s_ptr, stride_sn, QUANT, 1)
    if head >= HQ + HKV:  # v: no norm, no RoPE
        v_dst = vc_ptr + slot[:, None] * stride_cslot + (head - HQ - HKV) * stride_ch + offs_c[None, :]
        v_mask = s_ok[:, None] & c_ok[None, :]
        tl.store(v_dst, _jit.cast(acc_lo, v_dst.dtype.element_ty, PRECISION), mask=v_mask)
        tl.store(v_dst + HALF, _jit.cast(acc_hi, v_dst.dtype.element_ty, PRECISION), mask=v_mask)
    else:
        n_lo, n_hi, cos, sin = _head_inputs(head, qn_ptr, kn_ptr, cs_ptr, pos, stride_cs, offs_c, c_ok, HQ, HALF)
        _finish_head(acc_lo, acc_hi, head, offs_m, m_ok, slot, s_ok, offs_c, c_ok, n_lo, n_hi, cos, sin, q_ptr,
                     kc_ptr, HQ * D, D, stride_cslot, stride_ch, eps, HQ, D, HALF, PRECISION)


@triton.jit
def _attention_task(t, q_ptr, kc_ptr, vc_ptr, attn_ptr, part_ptr, arr_ptr, ctx, blk0, num_blocks, block_size,
                    stride_cslot, stride_ch, scale, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                    BLOCK_KV: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr):
    """Task t = kv head x SPLITS + split: the kv head's query heads over the split's share of the keys
    (split_keys); with more than one active split each parks its partials and the last to arrive
    (an acq_rel count per kv head, put back to 0 by that last one) merges them."""
    kvh = t // SPLITS
    split = t % SPLITS
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    g_ok = offs_g < G
    d_ok = offs_d < D
    heads = kvh * G + offs_g
    mask = g_ok[:, None] & d_ok[None, :]
    active, start, end = split_keys(ctx, split, SPLITS, MIN_SPLIT_BLOCKS, BLOCK_KV)
    q = tl.load(q_ptr + heads[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    acc, m_i, l_i = attend_range(q, kc_ptr, vc_ptr, kc_ptr, 0, kvh, start, end, blk0, 0, num_blocks, block_size, 1,
                                 0, stride_cslot, stride_ch, offs_d, d_ok, scale, G_PAD, D, BLOCK_KV, False, True,
                                 PRECISION)
    dst = attn_ptr + heads[:, None] * D + offs_d[None, :]
    if active == 1:
        if split == 0:
            o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(dst, _jit.cast(o, dst.dtype.element_ty, PRECISION), mask=mask)
    elif split < active:
        W: tl.constexpr = D + 2
        park_split(part_ptr + t * G_PAD * W, acc, m_i, l_i, offs_g, offs_d, D, W)
        arrived = tl.atomic_add(arr_ptr + kvh, 1, sem="acq_rel", scope="gpu")
        if arrived == active - 1:  # the last split merges all of them
            o = merge_splits(part_ptr + kvh * SPLITS * G_PAD * W, active, offs_g, offs_d, G_PAD, D, W)
            tl.store(dst, _jit.cast(o, dst.dtype.element_ty, PRECISION), mask=mask)
            tl.atomic_xchg(arr_ptr + kvh, 0)


@triton.jit
def _rows_task(t, x_ptr, nw_ptr, w_ptr, s_ptr, stride_sn, eps, cnt_ptr, target, err_ptr,
               N: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
               PAIR: tl.constexpr, PRECISION: tl.constexpr, QUANT: tl.constexpr, MAX_SPIN: tl.constexpr,
               TIMERS: tl.constexpr):
    """BLOCK_N output rows of a projection of the one token x [K]: their weights requested, then the
    wait for x (stage counter at cnt_ptr reaching target), then x @ W[rows].T. PAIR: gate/up - also
    rows N + rows, of RMSNorm(x) with norm weight nw. Returns (acc, acc of the pair's second rows,
    rows, their mask, the time the wait ended)."""
    offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_m = tl.arange(0, 1).to(tl.int64)
    m_ok = offs_m < 1
    rows_b = N + offs_n if PAIR else offs_n
    w_a, w_b, nw, sc_a, sc_b = _jit.request(w_ptr, s_ptr, nw_ptr, offs_n, rows_b, n_ok, K, stride_sn, K, PAIR, PAIR,
                                            BLOCK_N, BLOCK_K, EVEN_K, False, QUANT)
    waited = wait_count(cnt_ptr, target, err_ptr, MAX_SPIN, TIMERS)
    acc_a, acc_b = _jit.project(x_ptr, nw_ptr, w_ptr, offs_n, rows_b, n_ok, offs_m, m_ok, K, K, K, eps, w_a, w_b, nw,
                                sc_a, sc_b, PAIR, PAIR, 1, BLOCK_N, BLOCK_K, EVEN_K, False, PRECISION, False,
                                K <= BLOCK_K, s_ptr, stride_sn, QUANT, 1)
    return acc_a, acc_b, offs_n, n_ok, waited


@triton.jit
def _residual_task(t, a_ptr, w_ptr, s_ptr, r_ptr, out_ptr, stride_sn, cnt_ptr, target, err_ptr,
                   N: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                   PRECISION: tl.constexpr, QUANT: tl.constexpr, MAX_SPIN: tl.constexpr, TIMERS: tl.constexpr):
    """out[rows] = r[rows] + a @ W[rows].T for BLOCK_N rows (o_proj, down), after the wait for a and r."""
    acc, _, offs_n, n_ok, waited = _rows_task(t, a_ptr, a_ptr, w_ptr, s_ptr, stride_sn, 0.0, cnt_ptr, target, err_ptr,
                                              N, K, BLOCK_N, BLOCK_K, EVEN_K, False, PRECISION, QUANT, MAX_SPIN,
                                              TIMERS)
    r = tl.load(r_ptr + offs_n, mask=n_ok, other=0.0)
    dtype = out_ptr.dtype.element_ty
    y = _jit.cast(_jit.cast(acc, dtype, PRECISION).to(tl.float32) + r.to(tl.float32)[None, :], dtype, PRECISION)
    tl.store(out_ptr + offs_n[None, :], y, mask=n_ok[None, :])
    return waited


@triton.jit
def _gate_up_task(t, x_ptr, nw_ptr, w_ptr, s_ptr, act_ptr, stride_sn, eps, cnt_ptr, target, err_ptr,
                  H: tl.constexpr, I: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                  PRECISION: tl.constexpr, QUANT: tl.constexpr, MAX_SPIN: tl.constexpr, TIMERS: tl.constexpr):
    """act[rows] = silu(gate) * up of RMSNorm(x) for BLOCK_N intermediate rows, after the wait for x."""
    acc_g, acc_u, offs_n, n_ok, waited = _rows_task(t, x_ptr, nw_ptr, w_ptr, s_ptr, stride_sn, eps, cnt_ptr, target,
                                                    err_ptr, I, H, BLOCK_N, BLOCK_K, EVEN_K, True, PRECISION, QUANT,
                                                    MAX_SPIN, TIMERS)
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(act_ptr + offs_n[None, :], _jit.cast(act, act_ptr.dtype.element_ty, PRECISION), mask=n_ok[None, :])
    return waited


@triton.jit
def _decode_layer_kernel(
    x_ptr, xm_ptr, out_ptr,  # [H]: the residual stream in, after attention, out
    in_nw_ptr, wqkv_ptr, sqkv_ptr, qn_ptr, kn_ptr, cs_ptr,  # attention's norm, w_qkv (+ scales), q/k-norm, RoPE
    post_nw_ptr, wo_ptr, so_ptr, wgu_ptr, sgu_ptr, wd_ptr, sd_ptr,  # the other weights (+ scales)
    kc_ptr, vc_ptr,  # [num_slots, HKV, D] (flattened blocks)
    pos_ptr, slot_ptr, ctx_ptr, bt_ptr,  # [1] each: position, cache slot, context length, the sequence's block
    q_ptr, attn_ptr, act_ptr,  # scratch: [HQ * D], [HQ * D], [I]
    part_ptr, arr_ptr,  # SPLITS > 1: float32 [HKV * SPLITS, G_PAD, D + 2] partials; int32 [HKV] arrivals, 0 between launches
    cnt_ptr, err_ptr,  # the layer state: int64 [1 + STAGES] (arrivals, done per stage), int32 [1]
    tim_ptr,  # TIMERS: int64 [P, SLOTS, 3]: each task's start, end of its wait, end (ns, %globaltimer)
    order_ptr,  # ORDERED: int32 [tasks]: the task run at each place of the list (a permutation within each stage)
    num_blocks, block_size, max_pos,
    stride_sqkv, stride_so, stride_sgu, stride_sd, stride_cs, stride_cslot, stride_ch,
    eps, scale,
    P, SLOTS,  # programs in the grid; the most tasks one program runs (TIMERS' rows per program)
    H: tl.constexpr, I: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BK_H: tl.constexpr, BK_A: tl.constexpr, BK_I: tl.constexpr, BLOCK_KV: tl.constexpr,
    SPLITS: tl.constexpr, EVEN_H: tl.constexpr, EVEN_A: tl.constexpr, EVEN_I: tl.constexpr,
    PRECISION: tl.constexpr, QUANT: tl.constexpr, MAX_SPIN: tl.constexpr, TIMERS: tl.constexpr,
    ORDERED: tl.constexpr,
):
    ticket = tl.atomic_add(cnt_ptr, 1)
    launch = ticket // P
    me = (ticket % P).to(tl.int32)
    T0 = HQ + 2 * HKV
    T1 = HKV * SPLITS
    T2 = tl.cdiv(H, BLOCK_N)
    T3 = tl.cdiv(I, BLOCK_N)
    T4 = T2
    # what no program of this launch writes: read once, before any wait
    offs_m = tl.arange(0, 1).to(tl.int64)
    pos = tl.load(pos_ptr + offs_m).to(tl.int64)
    pos = tl.minimum(tl.maximum(pos, 0), max_pos - 1)  # never read outside the RoPE table
    slot = tl.load(slot_ptr + offs_m).to(tl.int64)
    s_ok = (slot >= 0) & (slot < num_blocks * block_size)  # -1 (and anything out of range) is not written
    ctx = tl.load(ctx_ptr)
    blk0 = tl.load(bt_ptr).to(tl.int64)
    for place in range(me, T0 + T1 + T2 + T3 + T4, P):
        if ORDERED:
            t = tl.load(order_ptr + place)
        else:
            t = place
        started = now(t, TIMERS)
        waited = started
        if t < T0:
            _qkv_task(t, x_ptr, in_nw_ptr, wqkv_ptr, sqkv_ptr, qn_ptr, kn_ptr, cs_ptr, pos, slot, s_ok, q_ptr, kc_ptr,
                      vc_ptr, stride_sqkv, stride_cs, stride_cslot, stride_ch, eps, H, HQ, HKV, D, D // 2, BK_H,
                      EVEN_H, PRECISION, QUANT)
            arrive(cnt_ptr + 1)
        elif t < T0 + T1:
            waited = wait_count(cnt_ptr + 1, (launch + 1) * T0, err_ptr, MAX_SPIN, TIMERS)
            _attention_task(t - T0, q_ptr, kc_ptr, vc_ptr, attn_ptr, part_ptr, arr_ptr, ctx, blk0, num_blocks,
                            block_size, stride_cslot, stride_ch, scale, HQ // HKV, G_PAD, D, BLOCK_KV, SPLITS,
                            PRECISION)
            arrive(cnt_ptr + 2)
        elif t < T0 + T1 + T2:
            waited = _residual_task(t - T0 - T1, attn_ptr, wo_ptr, so_ptr, x_ptr, xm_ptr, stride_so, cnt_ptr + 2,
                                    (launch + 1) * T1, err_ptr, H, HQ * D, BLOCK_N, BK_A, EVEN_A, PRECISION, QUANT,
                                    MAX_SPIN, TIMERS)
            arrive(cnt_ptr + 3)
        elif t < T0 + T1 + T2 + T3:
            waited = _gate_up_task(t - T0 - T1 - T2, xm_ptr, post_nw_ptr, wgu_ptr, sgu_ptr, act_ptr, stride_sgu, eps,
                                   cnt_ptr + 3, (launch + 1) * T2, err_ptr, H, I, BLOCK_N, BK_H, EVEN_H, PRECISION,
                                   QUANT, MAX_SPIN, TIMERS)
            arrive(cnt_ptr + 4)
        else:
            waited = _residual_task(t - T0 - T1 - T2 - T3, act_ptr, wd_ptr, sd_ptr, xm_ptr, out_ptr, stride_sd,
                                    cnt_ptr + 4, (launch + 1) * T3, err_ptr, H, I, BLOCK_N, BK_I, EVEN_I, PRECISION,
                                    QUANT, MAX_SPIN, TIMERS)
            arrive(cnt_ptr + 5)
        if TIMERS:
            row = tim_ptr + ((t % P).to(tl.int64) * SLOTS + t // P) * 3  # by task, whichever program ran it
            tl.store(row, started)
            tl.store(row + 1, waited)
            tl.store(row + 2, now(t, TIMERS))


@dataclasses.dataclass
class LayerState:
    """Device memory a layer kernel's launches share: int64 counters (arrivals, done per stage) that
    only grow, the error flag, and the grid size they were counted with (0 until the first launch
    when created with programs=0: then as many programs as can be resident at once)."""
    counters: torch.Tensor
    error: torch.Tensor
    programs: int
    scratch: dict = dataclasses.field(default_factory=dict)  # (dtype, sizes) -> the rows a launch passes between stages

    def rows(self, dtype: torch.dtype, *sizes: int) -> list[torch.Tensor]:
        """Scratch rows of these sizes, allocated once per dtype and sizes: a launch's stages pass
        data through them and nothing outlives the launch, so the layers of a step share them."""
        key = (dtype, sizes)
        if key not in self.scratch:
            self.scratch[key] = [torch.empty(n, dtype=dtype, device=self.counters.device) for n in sizes]
        return self.scratch[key]

    def arrivals(self, n: int) -> torch.Tensor:
        """n int32 counts, zeroed once: the attention splits' arrivals per kv head (each launch's last
        split puts its count back to 0)."""
        if ("arrivals", n) not in self.scratch:
            self.scratch[("arrivals", n)] = torch.zeros(n, dtype=torch.int32, device=self.counters.device)
        return self.scratch[("arrivals", n)]

    @classmethod
    def new(cls, device: torch.device, programs: int = 0) -> "LayerState":
        check(programs >= 0, f"decode_layer: programs={programs}, expected >= 0 (0: as many as fit at once)")
        return cls(torch.zeros(1 + STAGES, dtype=torch.int64, device=device),
                   torch.zeros(1, dtype=torch.int32, device=device), programs)


def layer_shape(cfg, batch: int) -> dict:
    """The lookup's shape fields of decode_layer (common.tiles.decode_layer_key)."""
    return dict(batch=batch, hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
                heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads)


MAX_PROGRAMS_PER_SM = 32  # resident thread blocks per SM (compute capability 7.0 and newer)


def resident_programs(n_regs: int, shared: int, warps: int, props: dict, tasks: int) -> int:
    """How many programs of a compiled kernel (n_regs registers per thread, `shared` bytes of shared
    memory, `warps` warps) the GPU (props: its SM count, registers, shared memory and threads per SM)
    holds at once - every SM filled as far as the scarcest of the four allows - capped at `tasks` (the
    largest stage's task count: more programs would only wait). A grid past this could deadlock."""
    threads = warps * props.get("warpSize", 32)
    per_sm = min(props["max_num_regs"] // max(1, n_regs * threads), props["max_threads_per_sm"] // threads,
                 MAX_PROGRAMS_PER_SM)
    if shared:
        per_sm = min(per_sm, props["max_shared_mem"] // shared)
    check(per_sm >= 1, f"decode_layer: one program needs {n_regs} registers x {threads} threads and {shared} "
                       f"bytes of shared memory, more than an SM holds")
    return max(1, min(per_sm * props["multiprocessor_count"], tasks))


def _gpu_props(device: torch.device) -> dict:
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = dict(triton.runtime.driver.active.utils.get_device_properties(index))
    props["max_threads_per_sm"] = getattr(torch.cuda.get_device_properties(index), "max_threads_per_multi_processor",
                                          2048)  # every GPU from compute capability 7.5 on
    return props


def check_state(state: LayerState) -> None:
    """Raise if a bounded wait of a launch over `state` gave up (a host sync)."""
    if int(state.error.item()):
        raise RuntimeError("decode_layer: a stage waited past max_spin for the stage before it (a program that "
                           "never ran, or a lost release); the step's output is wrong")


def decode_layer(x: torch.Tensor, layer, k_cache: torch.Tensor, v_cache: torch.Tensor, cos_sin: torch.Tensor,
                 positions: torch.Tensor, slots: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
                 state: LayerState, *, eps: float, tiles: LayerTiles | None = None, max_spin: int = 0,
                 out: torch.Tensor | None = None, timers: torch.Tensor | None = None,
                 order: torch.Tensor | None = None) -> torch.Tensor:
    """One decoder layer of one token: x [1, H] -> [1, H], writing the token's k and v at slots[0]
    (-1: nowhere) and attending over the first context_lens[0] keys of block block_tables[0, 0] (one
    block per sequence). `layer`: a torch_impl OptimizedQwen3DecoderLayer (bf16, int8 or fp8 weights).
    `state` (LayerState) carries the counters across launches; max_spin > 0 bounds every wait;
    `tiles` default to common.tiles' choice for the layer's shape. `timers` (a GPU, `timer_buffer`): each
    task's start, end of its wait and end in nanoseconds, for `stage_times`. `order` (stress tests,
    `task_order`): int32 [tasks], the task run at each place of the list, a permutation within each stage."""
    op = "decode_layer"
    cfg = layer.cfg
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    h, i = cfg.hidden_size, cfg.intermediate_size
    check(x.dim() == 2 and x.shape == (1, h), f"{op}: x has shape {list(x.shape)}, expected [1, {h}]")
    check(d == next_pow2(d) and d >= 16, f"{op}: head_dim={d}, expected a power of two >= 16")
    check(block_tables.dim() == 2 and block_tables.shape[1] == 1,
          f"{op}: block_tables has shape {list(block_tables.shape)}, expected [1, 1] (one block per sequence)")
    check_float(op, x=x, k_cache=k_cache, v_cache=v_cache)
    check_device(op, x=x, k_cache=k_cache, positions=positions, slots=slots, context_lens=context_lens)
    attn, mlp = layer.self_attn, layer.mlp
    wqkv, sqkv, stride_sqkv, fmt = split_weight(op, "w_qkv", attn.qkv_proj.w, x.dtype)
    wo, so, stride_so, _ = split_weight(op, "w_o", attn.o_proj.w, x.dtype)
    wgu, sgu, stride_sgu, _ = split_weight(op, "w_gate_up", mlp.gate_up_proj.w, x.dtype)
    wd, sd, stride_sd, _ = split_weight(op, "w_down", mlp.down_proj.w, x.dtype)
    for name, w, k in (("w_qkv", wqkv, h), ("w_o", wo, hq * d), ("w_gate_up", wgu, h), ("w_down", wd, i)):
        check(w.dim() == 2 and w.shape[1] == k and w.stride() == (k, 1),
              f"{op}: {name} is {list(w.shape)} with strides {w.stride()}, expected contiguous [*, {k}]")
    tiles = tiles_for("decode_layer", op, tiles, LayerTiles, x.device, x.dtype, fmt, **layer_shape(cfg, 1))
    xm, q, attn_out, act = state.rows(x.dtype, h, hq * d, hq * d, i)
    g_pad, splits = max(16, next_pow2(hq // hkv)), tiles.num_splits
    part, arrivals = state.counters, state.counters  # (unused with one split)
    if splits > 1:
        part, = state.rows(torch.float32, hkv * splits * g_pad * (d + 2))
        arrivals = state.arrivals(hkv)
    out = torch.empty_like(x) if out is None else out
    bk = tiles.block_k
    bk_h, bk_a, bk_i = min(bk, next_pow2(h)), min(bk, next_pow2(hq * d)), min(bk, next_pow2(i))
    args = [x, xm, out, layer.input_layernorm.weight, wqkv, sqkv, attn.q_norm.weight, attn.k_norm.weight, cos_sin,
            layer.post_attention_layernorm.weight, wo, so, wgu, sgu, wd, sd, k_cache, v_cache,
            positions, slots, context_lens, block_tables, q, attn_out, act, part, arrivals, state.counters, state.error,
            state.counters if timers is None else timers, state.counters if order is None else order,
            k_cache.shape[0], k_cache.shape[1], cos_sin.shape[0],
            stride_sqkv, stride_so, stride_sgu, stride_sd, cos_sin.stride(0), k_cache.stride(1), k_cache.stride(2),
            eps, 1.0 / math.sqrt(d)]
    meta = dict(H=h, I=i, HQ=hq, HKV=hkv, D=d, G_PAD=g_pad, BLOCK_N=tiles.block_n,
                BK_H=bk_h, BK_A=bk_a, BK_I=bk_i, BLOCK_KV=tiles.block_kv, SPLITS=splits, EVEN_H=h % bk_h == 0,
                EVEN_A=(hq * d) % bk_a == 0, EVEN_I=i % bk_i == 0, PRECISION=precision(x.dtype),
                QUANT=formats.get(fmt).code, MAX_SPIN=max_spin, TIMERS=False, ORDERED=order is not None,
                num_warps=tiles.num_warps)
    total = sum(stage_tasks(cfg, tiles))
    if order is not None:
        _check_order(op, order, stage_tasks(cfg, tiles), x.device)
    if state.programs == 0:  # the first launch over this state sizes its grid
        if x.is_cuda and not interpreting():
            compiled = _decode_layer_kernel.warmup(*args, 1, total, grid=(1,), **meta)
            compiled._init_handles()
            state.programs = resident_programs(compiled.n_regs, compiled.metadata.shared, compiled.metadata.num_warps,
                                               _gpu_props(x.device), max(stage_tasks(cfg, tiles)))
        else:
            state.programs = 1
    check(state.programs == 1 or (x.is_cuda and not interpreting()),
          f"{op}: {state.programs} programs need a GPU where they run at once (Triton's interpreter runs programs "
          f"one after another: use 1)")
    slots_per_program = -(-total // state.programs)
    if timers is not None:
        check(x.is_cuda and not interpreting(), f"{op}: timers read the GPU's %globaltimer (not in the interpreter)")
        check(timers.dtype == torch.int64 and timers.numel() >= state.programs * slots_per_program * 3,
              f"{op}: timers is {timers.dtype} [{timers.numel()}], expected int64 of at least "
              f"{state.programs * slots_per_program * 3} (timer_buffer)")
        meta["TIMERS"] = True
    _decode_layer_kernel[(state.programs,)](*args, state.programs, slots_per_program, **meta)
    return out


def stage_tasks(cfg, tiles: LayerTiles) -> list[int]:
    """Tasks of each stage: qkv heads, kv heads x splits, o_proj, gate/up and down row blocks."""
    h, i, bn = cfg.hidden_size, cfg.intermediate_size, tiles.block_n
    return [cfg.num_attention_heads + 2 * cfg.num_key_value_heads, cfg.num_key_value_heads * tiles.num_splits, -(-h // bn),
            -(-i // bn), -(-h // bn)]


def task_order(cfg, tiles: LayerTiles, device, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """A stress test's `order` for decode_layer: each stage's tasks reversed, or shuffled with `generator`."""
    parts, start = [], 0
    for n in stage_tasks(cfg, tiles):
        idx = torch.arange(start, start + n) if generator is None else start + torch.randperm(n, generator=generator)
        parts.append(idx.flip(0) if generator is None else idx)
        start += n
    return torch.cat(parts).to(device=device, dtype=torch.int32)


def _check_order(op: str, order: torch.Tensor, counts: list[int], device) -> None:
    """order: int32 on the launch's device, each stage's places holding a permutation of its tasks (a host sync)."""
    total = sum(counts)
    check(order.dtype == torch.int32 and order.shape == (total,) and order.device == device,
          f"{op}: order is {order.dtype} {list(order.shape)} on {order.device}, expected int32 [{total}] on {device}")
    got, start = order.cpu(), 0
    for s, n in enumerate(counts):
        check(torch.equal(got[start:start + n].sort().values, torch.arange(start, start + n, dtype=torch.int32)),
              f"{op}: order's places {start}..{start + n - 1} (stage {STAGE_NAMES[s]}) are not a permutation of "
              f"that stage's tasks")
        start += n


def timer_buffer(cfg, tiles: LayerTiles, programs: int, device) -> torch.Tensor:
    """A zeroed int64 buffer for one timed launch of `programs` programs (decode_layer's `timers`)."""
    return torch.zeros(programs, -(-sum(stage_tasks(cfg, tiles)) // programs), 3, dtype=torch.int64, device=device)


STAGE_NAMES = ("qkv", "attention", "o_proj", "gate_up", "down")


def stage_times(timers, cfg, tiles: LayerTiles, programs: int) -> list[dict]:
    """Per stage of one timed launch: tasks, mean microseconds a task waited and worked, and the span
    from the stage's first task start to its last task end (relative to the launch's first start)."""
    import numpy as np  # noqa: PLC0415

    t = np.asarray(timers.cpu(), dtype=np.int64).reshape(programs, -1, 3)
    counts = stage_tasks(cfg, tiles)
    bounds = np.cumsum([0] + counts)
    origin = t[t[:, :, 0] > 0, 0].min()
    rows = []
    for s, name in enumerate(STAGE_NAMES):
        recs = [t[task % programs, task // programs] for task in range(bounds[s], bounds[s + 1])]
        recs = np.asarray(recs, dtype=np.float64)
        rows.append(dict(stage=name, tasks=counts[s], wait_us=float((recs[:, 1] - recs[:, 0]).mean() / 1e3),
                         work_us=float((recs[:, 2] - recs[:, 1]).mean() / 1e3),
                         start_us=float((recs[:, 0].min() - origin) / 1e3), end_us=float((recs[:, 2].max() - origin) / 1e3)))
    return rows
